/*
 * kernel-espada: a charon kernel-ipsec plugin that programs the espada dataplane (issue 14).
 *
 * charon negotiates; espada carries. Each kernel-ipsec call becomes one JSON line on espada's
 * control socket (mode 0600; `espada run --control PATH`), on a connection kept for the next
 * calls (up to 4 idle, each reused for 5 s):
 *   add_sa    -> {"cmd":"sa","what":"add","args":{"local","remote","dir","spi","key","esn",
 *                 "replay_window"[,"cpu"]}}   (the tunnel is the one with these endpoints)
 *   query_sa  -> {"cmd":"show","what":"sa"}   (packets and bytes of the SPI)
 *   del_sa    -> {"cmd":"sa","what":"del","args":{"spi"}}
 * Policies stay with espada's configuration (its SPD); addresses and routes with charon's
 * kernel-netlink plugin; IKE reaches charon through `espada run --ike-tun`. espada carries
 * ESP-in-UDP with AES-GCM only: the plugin says so (KERNEL_REQUIRE_UDP_ENCAPSULATION) and
 * refuses anything else with a log line.
 *
 * Settings: charon.plugins.kernel-espada.socket (default /run/espada/espada.sock).
 * Built against a strongSwan build tree by scripts/strongswan (out of tree, config.h included).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* struct ucred (SO_PEERCRED) */
#endif
#include <daemon.h>
#include <plugins/plugin.h>
#include <kernel/kernel_ipsec.h>
#include <crypto/rngs/rng.h>
#include <threading/mutex.h>
#include <processing/jobs/callback_job.h>
#include <processing/jobs/delete_ike_sa_job.h>

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

/* A tunnel charon routes (trap policy): its endpoints and reqid, so a worker's acquire from
 * espada finds the CHILD_SA config it is for. */
typedef struct {
	char local[64];
	char remote[64];
	uint32_t reqid;
	/* The last policy's pcpu_acquires (RFC 9611: whether the peer agreed to per-CPU SAs). */
	bool pcpu;
} trap_t;

#define MAX_TRAPS 32

/* A connection to espada's control socket kept for the next requests: a rekey makes several
 * in a row, and each fresh connection costs a connect, espada's accept and a thread there,
 * and the ownership checks. espada serves up to 64 requests within 10 s on one connection, so
 * one older than CONN_REUSE_S or with CONN_REUSE_MAX requests is closed, not reused. */
typedef struct {
	int fd;
	time_t born;
	int used;
} conn_t;

#define CONN_IDLE 4
#define CONN_REUSE_S 5
#define CONN_REUSE_MAX 48

typedef struct private_kernel_espada_ipsec_t {
	kernel_ipsec_t public;
	char *socket;
	rng_t *rng;
	mutex_t *mutex;
	trap_t traps[MAX_TRAPS];
	int ntraps;
	/* espada's run ("boot" in `sa acquires`): a new one means espada restarted and lost the
	 * SAs charon installed. */
	uint64_t boot;
	/* Set by destroy: the acquire poller frees the object on its next run (it may be
	 * scheduled still; at charon's shutdown the scheduler goes first and this is a leak). */
	bool destroyed;
	/* This charon's run (random, named in every request that installs or polls): a new run
	 * tells espada that the SAs the old one installed are orphans (charon killed). */
	uint64_t run;
	/* Idle connections (under the mutex: taken and put back only, never used under it). */
	conn_t idle[CONN_IDLE];
	int nidle;
} private_kernel_espada_ipsec_t;

/* Longest answer read (`sa acquires` after a long outage, `show sa` of many SAs). */
#define MAX_ANSWER (4 * 1024 * 1024)
/* Each request's whole exchange (connect, write, read) on the control socket. */
#define IO_TIMEOUT_S 2

/* Whether the listener on `path` is espada's: the socket file belongs to root or to us and
 * nobody else may write to it (espada makes it 0600), and the process that accepted the
 * connection runs as root or as us (SO_PEERCRED). Keys go nowhere else. */
static bool trusted_peer(const char *path, int fd)
{
	struct stat st;
	struct ucred cred;
	socklen_t len = sizeof(cred);
	uid_t me = geteuid();

	if (lstat(path, &st) != 0 || !S_ISSOCK(st.st_mode))
	{
		DBG1(DBG_KNL, "kernel-espada: %s is not a socket: refusing to talk to it", path);
		return FALSE;
	}
	if ((st.st_uid != 0 && st.st_uid != me) || (st.st_mode & (S_IWGRP | S_IWOTH)))
	{
		DBG1(DBG_KNL, "kernel-espada: %s is owned by uid %u with mode %o: espada's socket "
			 "belongs to root (or charon's user) with mode 0600; refusing to hand it keys",
			 path, (unsigned)st.st_uid, (unsigned)(st.st_mode & 07777));
		return FALSE;
	}
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 ||
		(cred.uid != 0 && cred.uid != me))
	{
		DBG1(DBG_KNL, "kernel-espada: the process listening on %s runs as uid %d, not root or "
			 "charon's user: refusing to hand it keys", path, (int)cred.uid);
		return FALSE;
	}
	return TRUE;
}

/* A fresh, checked connection to espada (-1 on failure, logged). */
static int connect_espada(private_kernel_espada_ipsec_t *this)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	struct timeval tv = { .tv_sec = IO_TIMEOUT_S };
	int fd;

	if (strlen(this->socket) >= sizeof(a.sun_path))
	{
		DBG1(DBG_KNL, "kernel-espada: socket path too long: %s", this->socket);
		return -1;
	}
	strcpy(a.sun_path, this->socket);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
	{
		DBG1(DBG_KNL, "kernel-espada: socket: %s", strerror(errno));
		return -1;
	}
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	if (connect(fd, (struct sockaddr*)&a, sizeof(a)) < 0)
	{
		DBG1(DBG_KNL, "kernel-espada: cannot reach espada at %s: %s (is `espada run "
			 "--control %s` running?)", this->socket, strerror(errno), this->socket);
		close(fd);
		return -1;
	}
	if (!trusted_peer(this->socket, fd))
	{
		close(fd);
		return -1;
	}
	DBG2(DBG_KNL, "kernel-espada: new connection to espada at %s", this->socket);
	return fd;
}

/* An idle connection young enough to reuse, or {-1}. One that espada closed meanwhile (it
 * reads as end of file) or that has unexpected data is closed here. */
static conn_t take_idle(private_kernel_espada_ipsec_t *this)
{
	conn_t c = { .fd = -1 };
	time_t now = time(NULL);

	while (TRUE)
	{
		struct pollfd p;

		this->mutex->lock(this->mutex);
		if (this->nidle == 0)
		{
			this->mutex->unlock(this->mutex);
			return (conn_t){ .fd = -1 };
		}
		c = this->idle[--this->nidle];
		this->mutex->unlock(this->mutex);
		p = (struct pollfd){ .fd = c.fd, .events = POLLIN };
		if (now - c.born < CONN_REUSE_S && c.used < CONN_REUSE_MAX &&
			poll(&p, 1, 0) == 0)
		{
			return c;
		}
		close(c.fd);
	}
}

/* Keeps a connection whose last answer was read whole, or closes it. */
static void put_idle(private_kernel_espada_ipsec_t *this, conn_t c)
{
	this->mutex->lock(this->mutex);
	if (this->nidle < CONN_IDLE && !this->destroyed)
	{
		this->idle[this->nidle++] = c;
		c.fd = -1;
	}
	this->mutex->unlock(this->mutex);
	if (c.fd >= 0)
	{
		close(c.fd);
	}
}

/* One request and its answer line on `fd`: the answer (malloc'd), or NULL with *sent saying
 * whether the request left at all (a connection espada closed takes no request). */
static char *exchange(private_kernel_espada_ipsec_t *this, int fd, const char *req,
					  bool *sent, bool quiet)
{
	size_t got = 0, cap = 4096, want = strlen(req);
	char *resp;

	*sent = FALSE;
	if (send(fd, req, want, MSG_NOSIGNAL) != (ssize_t)want ||
		send(fd, "\n", 1, MSG_NOSIGNAL) != 1)
	{
		if (!quiet)
		{
			DBG1(DBG_KNL, "kernel-espada: writing to espada at %s: %s", this->socket,
				 strerror(errno));
		}
		return NULL;
	}
	*sent = TRUE;
	resp = malloc(cap);
	while (resp)
	{
		ssize_t n;

		if (got + 1 >= cap)
		{
			char *more = cap * 2 <= MAX_ANSWER ? realloc(resp, cap * 2) : NULL;

			if (!more)
			{
				DBG1(DBG_KNL, "kernel-espada: espada's answer is longer than %d bytes",
					 MAX_ANSWER);
				free(resp);
				return NULL;
			}
			resp = more;
			cap *= 2;
		}
		n = read(fd, resp + got, cap - 1 - got);
		if (n <= 0)
		{
			if (n < 0)
			{
				DBG1(DBG_KNL, "kernel-espada: reading espada's answer: %s", strerror(errno));
			}
			else if (got == 0 && quiet)
			{	/* closed before it read the request: nothing was done */
				*sent = FALSE;
			}
			break;
		}
		got += n;
		if (memchr(resp + got - n, '\n', n))
		{
			break;
		}
	}
	if (resp && (got == 0 || !memchr(resp, '\n', got) || resp[got - 1] != '\n'))
	{	/* a whole line or nothing: a cut answer may have lost acquires or expires */
		if (got)
		{
			DBG1(DBG_KNL, "kernel-espada: espada's answer was cut short (%zu bytes)", got);
		}
		free(resp);
		return NULL;
	}
	if (resp)
	{
		resp[got] = '\0';
	}
	return resp;
}

/* One request, one answer line, on a kept connection when there is one (else a fresh one);
 * no lock is held meanwhile, and every step has a timeout. A kept connection espada had
 * closed (a restart, its per-connection limits) is replaced by a fresh one once, only when
 * the request never reached espada. Returns the answer (malloc'd, the caller frees it) or
 * NULL, having logged why. */
static char *request(private_kernel_espada_ipsec_t *this, const char *req)
{
	conn_t c = take_idle(this);
	char *resp = NULL;
	bool sent;

	if (c.fd >= 0)
	{
		resp = exchange(this, c.fd, req, &sent, TRUE);
		if (!resp)
		{
			close(c.fd);
			if (sent)
			{
				return NULL;
			}
		}
	}
	if (!resp)
	{
		c = (conn_t){ .fd = connect_espada(this), .born = time(NULL) };
		if (c.fd < 0)
		{
			return NULL;
		}
		resp = exchange(this, c.fd, req, &sent, FALSE);
		if (!resp)
		{
			close(c.fd);
			return NULL;
		}
	}
	c.used++;
	put_idle(this, c);
	return resp;
}

/* The printable address of a host (no printf hook: plain inet_ntop). */
static void addr_str(host_t *h, char *buf, size_t len)
{
	chunk_t a = h->get_address(h);

	if (!inet_ntop(h->get_family(h), a.ptr, buf, len))
	{
		snprintf(buf, len, "?");
	}
}

static bool answer_ok(const char *resp)
{
	return resp && strstr(resp, "\"ok\":true") != NULL;
}

/* The "error" of an answer, for the log (never the request: it may hold a key). */
static const char *answer_error(const char *resp)
{
	const char *e;

	if (!resp)
	{
		return "no answer (see above)";
	}
	e = strstr(resp, "\"error\":");
	return e ? e : resp;
}

METHOD(kernel_ipsec_t, get_features, kernel_feature_t,
	private_kernel_espada_ipsec_t *this)
{
	return KERNEL_REQUIRE_UDP_ENCAPSULATION;
}

METHOD(kernel_ipsec_t, get_spi, status_t,
	private_kernel_espada_ipsec_t *this, host_t *src, host_t *dst,
	uint8_t protocol, uint32_t *spi)
{
	uint32_t r;

	if (protocol != IPPROTO_ESP || !this->rng->get_bytes(this->rng, sizeof(r), (uint8_t*)&r))
	{
		return FAILED;
	}
	r = KERNEL_SPI_MIN | (r & (KERNEL_SPI_MAX - KERNEL_SPI_MIN));
	*spi = htonl(r);
	return SUCCESS;
}

METHOD(kernel_ipsec_t, get_cpi, status_t,
	private_kernel_espada_ipsec_t *this, host_t *src, host_t *dst,
	uint16_t *cpi)
{
	return NOT_SUPPORTED;
}

METHOD(kernel_ipsec_t, add_sa, status_t,
	private_kernel_espada_ipsec_t *this, kernel_ipsec_sa_id_t *id,
	kernel_ipsec_add_sa_t *data)
{
	char req[1536], *resp, cpu[32] = "", key[2 * 64 + 1], l[64], r[64], life[512] = "";
	host_t *local = data->inbound ? id->dst : id->src;
	host_t *remote = data->inbound ? id->src : id->dst;
	uint32_t window = data->replay_window;
	size_t i;

	if (id->proto != IPPROTO_ESP || data->mode != MODE_TUNNEL || !data->encap ||
		data->enc_alg != ENCR_AES_GCM_ICV16 || data->enc_key.len > 64 || data->ipcomp)
	{
		DBG1(DBG_KNL, "kernel-espada: espada carries ESP-in-UDP tunnel mode with "
			 "AES-GCM-16 only (SPI %.8x refused)", ntohl(id->spi));
		return NOT_SUPPORTED;
	}
	for (i = 0; i < data->enc_key.len; i++)
	{
		snprintf(key + 2 * i, 3, "%02x", data->enc_key.ptr[i]);
	}
	key[2 * data->enc_key.len] = '\0';
	if (data->cpu != CPU_ID_MAX)
	{
		snprintf(cpu, sizeof(cpu), ",\"cpu\":%u", data->cpu);
	}
	if (data->lifetime)
	{	/* espada counts them and reports soft/hard events back (`expires` in `sa acquires`),
		 * as the kernel's expire messages: charon rekeys or deletes on them */
		lifetime_cfg_t *lt = data->lifetime;

		snprintf(life, sizeof(life), ",\"soft_seconds\":%llu,\"hard_seconds\":%llu,"
				 "\"soft_bytes\":%llu,\"hard_bytes\":%llu,\"soft_packets\":%llu,"
				 "\"hard_packets\":%llu",
				 (unsigned long long)lt->time.rekey, (unsigned long long)lt->time.life,
				 (unsigned long long)lt->bytes.rekey, (unsigned long long)lt->bytes.life,
				 (unsigned long long)lt->packets.rekey, (unsigned long long)lt->packets.life);
	}
	if (!data->inbound && id->src->get_port(id->src))
	{	/* the UDP source port charon chose (per_cpu_sas = encap: one per per-CPU SA) */
		snprintf(cpu + strlen(cpu), sizeof(cpu) - strlen(cpu), ",\"port\":%u",
				 id->src->get_port(id->src));
	}
	window = max(64, min(window, 65536));
	addr_str(local, l, sizeof(l));
	addr_str(remote, r, sizeof(r));
	snprintf(req, sizeof(req),
			 "{\"cmd\":\"sa\",\"what\":\"add\",\"args\":{\"local\":\"%s\",\"remote\":\"%s\","
			 "\"dir\":\"%s\",\"spi\":%u,\"key\":\"%s\",\"esn\":%s,\"replay_window\":%u%s%s,"
			 "\"daemon\":%llu}}",
			 l, r, data->inbound ? "in" : "out", ntohl(id->spi), key,
			 data->esn ? "true" : "false", window, cpu, life, (unsigned long long)this->run);
	memwipe(key, sizeof(key));
	resp = request(this, req);
	memwipe(req, sizeof(req));
	if (!answer_ok(resp))
	{
		DBG1(DBG_KNL, "kernel-espada: adding %s SA %.8x failed: %s",
			 data->inbound ? "inbound" : "outbound", ntohl(id->spi), answer_error(resp));
		free(resp);
		return FAILED;
	}
	free(resp);
	DBG1(DBG_KNL, "kernel-espada: %s SA %.8x installed in espada%s (soft %llu s, hard %llu s)",
		 data->inbound ? "inbound" : "outbound", ntohl(id->spi), cpu,
		 data->lifetime ? (unsigned long long)data->lifetime->time.rekey : 0ULL,
		 data->lifetime ? (unsigned long long)data->lifetime->time.life : 0ULL);
	return SUCCESS;
}

METHOD(kernel_ipsec_t, update_sa, status_t,
	private_kernel_espada_ipsec_t *this, kernel_ipsec_sa_id_t *id,
	kernel_ipsec_update_sa_t *data)
{
	/* MOBIKE / NAT changes of the endpoints: espada's tunnels have fixed endpoints. */
	return NOT_SUPPORTED;
}

METHOD(kernel_ipsec_t, query_sa, status_t,
	private_kernel_espada_ipsec_t *this, kernel_ipsec_sa_id_t *id,
	kernel_ipsec_query_sa_t *data, uint64_t *bytes, uint64_t *packets,
	time_t *time)
{
	char req[128], *resp;
	const char *p;

	/* Only this SA's row: its own "bytes" and "packets" (the lifetime limits inside it are
	 * "soft_bytes", "hard_packets", ...: the leading quote keeps them apart). */
	snprintf(req, sizeof(req), "{\"cmd\":\"show\",\"what\":\"sa\",\"args\":{\"spi\":%u}}",
			 ntohl(id->spi));
	resp = request(this, req);
	if (!answer_ok(resp) || !strstr(resp, "\"spi\":\"0x"))
	{
		free(resp);
		return NOT_FOUND;
	}
	if (bytes)
	{
		p = strstr(resp, "\"bytes\":");
		*bytes = p ? strtoull(p + 8, NULL, 10) : 0;
	}
	if (packets)
	{
		p = strstr(resp, "\"packets\":");
		*packets = p ? strtoull(p + 10, NULL, 10) : 0;
	}
	if (time)
	{	/* the newest use on any core (UNIX seconds), as charon's monotonic clock has it:
		 * dead peer detection must not fire on a tunnel that carries traffic */
		struct timeval tv;
		time_t now = time_monotonic(NULL), wall;
		uint64_t used;

		gettimeofday(&tv, NULL); /* the wall clock (`time` is this method's parameter) */
		wall = tv.tv_sec;

		p = strstr(resp, "\"last_use\":");
		used = p ? strtoull(p + 11, NULL, 10) : 0;
		*time = (used && (time_t)used <= wall) ? now - (wall - (time_t)used) : 0;
	}
	free(resp);
	return SUCCESS;
}

METHOD(kernel_ipsec_t, del_sa, status_t,
	private_kernel_espada_ipsec_t *this, kernel_ipsec_sa_id_t *id,
	kernel_ipsec_del_sa_t *data)
{
	char req[128], *resp;

	snprintf(req, sizeof(req), "{\"cmd\":\"sa\",\"what\":\"del\",\"args\":{\"spi\":%u}}",
			 ntohl(id->spi));
	resp = request(this, req);
	if (resp && !answer_ok(resp))
	{
		/* An outbound SA replaced by its successor is gone already; espada keeps a
		 * tunnel's last SAs until the tunnel goes: both are fine for charon. */
		DBG2(DBG_KNL, "kernel-espada: SA %.8x: %s", ntohl(id->spi), answer_error(resp));
	}
	free(resp);
	return SUCCESS;
}

METHOD(kernel_ipsec_t, flush_sas, status_t,
	private_kernel_espada_ipsec_t *this)
{
	return SUCCESS;
}

METHOD(kernel_ipsec_t, add_policy, status_t,
	private_kernel_espada_ipsec_t *this, kernel_ipsec_policy_id_t *id,
	kernel_ipsec_manage_policy_t *data)
{
	char l[64], r[64], req[256], *resp;
	bool changed = FALSE;
	int i;

	/* espada's SPD comes from its configuration; what the plugin keeps is the reqid of each
	 * outbound IPsec policy, for the acquires espada's workers raise, and whether per-CPU
	 * acquires are wanted (charon installs the policy with pcpu_acquires = FALSE when the
	 * peer did not agree to per-CPU SAs, and for a trap policy before anything is
	 * negotiated): espada is told when that changes. */
	if (id->dir != POLICY_OUT || data->type != POLICY_IPSEC || !data->sa || !data->src ||
		!data->dst)
	{
		return SUCCESS;
	}
	addr_str(data->src, l, sizeof(l));
	addr_str(data->dst, r, sizeof(r));
	this->mutex->lock(this->mutex);
	for (i = 0; i < this->ntraps; i++)
	{
		if (streq(this->traps[i].local, l) && streq(this->traps[i].remote, r))
		{
			break;
		}
	}
	if (i < MAX_TRAPS)
	{
		snprintf(this->traps[i].local, sizeof(this->traps[i].local), "%s", l);
		snprintf(this->traps[i].remote, sizeof(this->traps[i].remote), "%s", r);
		this->traps[i].reqid = data->sa->reqid;
		changed = i >= this->ntraps || this->traps[i].pcpu != data->pcpu_acquires;
		this->traps[i].pcpu = data->pcpu_acquires;
		this->ntraps = max(this->ntraps, i + 1);
	}
	this->mutex->unlock(this->mutex);
	if (changed)
	{	/* not under the mutex */
		snprintf(req, sizeof(req), "{\"cmd\":\"sa\",\"what\":\"acquire-mode\",\"args\":"
				 "{\"local\":\"%s\",\"remote\":\"%s\",\"pcpu\":%s}}", l, r,
				 data->pcpu_acquires ? "true" : "false");
		resp = request(this, req);
		DBG1(DBG_KNL, "kernel-espada: per-CPU acquires %s for %s...%s%s%s",
			 data->pcpu_acquires ? "on" : "off (a trap policy, or the peer did not agree to per-CPU SAs)", l, r,
			 answer_ok(resp) ? "" : ": ", answer_ok(resp) ? "" : answer_error(resp));
		free(resp);
	}
	return SUCCESS;
}

/* Copies the string value of "key":"..." found at or after p into out; the position after it. */
static const char *json_str(const char *p, const char *key, char *out, size_t len)
{
	const char *s = strstr(p, key), *e;

	if (!s)
	{
		return NULL;
	}
	s += strlen(key);
	e = strchr(s, '"');
	if (!e || (size_t)(e - s) >= len)
	{
		return NULL;
	}
	memcpy(out, s, e - s);
	out[e - s] = '\0';
	return e;
}

/* Every 200 ms: the acquires espada's workers raised (`sa acquires`), handed to charon as the
 * kernel's acquires are, with their CPU ID. */
static void free_ipsec(private_kernel_espada_ipsec_t *this)
{
	while (this->nidle > 0)
	{
		close(this->idle[--this->nidle].fd);
	}
	DESTROY_IF(this->rng);
	this->mutex->destroy(this->mutex);
	free(this->socket);
	free(this);
}

/* espada restarted: the SAs charon installed are gone from it. Every IKE_SA is deleted (the
 * peer is told and removes its side); the routed connections stay, so the next packet's
 * acquire negotiates everything again, as after a reboot. */
static void restarted(private_kernel_espada_ipsec_t *this)
{
	enumerator_t *enumerator;
	ike_sa_t *ike_sa;
	linked_list_t *ids = linked_list_create();
	ike_sa_id_t *id;

	DBG1(DBG_KNL, "kernel-espada: espada restarted and lost its SAs: deleting the IKE_SAs, "
		 "the next packets negotiate them again");
	enumerator = charon->ike_sa_manager->create_enumerator(charon->ike_sa_manager, TRUE);
	while (enumerator->enumerate(enumerator, &ike_sa))
	{
		ids->insert_last(ids, ike_sa->get_id(ike_sa)->clone(ike_sa->get_id(ike_sa)));
	}
	enumerator->destroy(enumerator);
	while (ids->remove_first(ids, (void**)&id) == SUCCESS)
	{
		lib->processor->queue_job(lib->processor,
								  (job_t*)delete_ike_sa_job_create(id, TRUE));
		id->destroy(id);
	}
	ids->destroy(ids);
}

static job_requeue_t poll_acquires(private_kernel_espada_ipsec_t *this)
{
	char *resp, l[64], r[64];
	const char *p, *end;
	bool restart = FALSE, destroyed;
	int i;

	this->mutex->lock(this->mutex);
	destroyed = this->destroyed;
	this->mutex->unlock(this->mutex);
	if (destroyed)
	{
		free_ipsec(this);
		return JOB_REQUEUE_NONE;
	}
	/* Not under the mutex: a slow espada must not stall charon's other threads. */
	{
		char poll[128];

		snprintf(poll, sizeof(poll),
				 "{\"cmd\":\"sa\",\"what\":\"acquires\",\"args\":{\"daemon\":%llu}}",
				 (unsigned long long)this->run);
		resp = request(this, poll);
	}
	if (!answer_ok(resp))
	{
		free(resp);
		return JOB_RESCHEDULE_MS(1000);
	}
	this->mutex->lock(this->mutex);
	p = strstr(resp, "\"boot\":");
	if (p)
	{
		uint64_t boot = strtoull(p + 7, NULL, 10);

		restart = this->boot && boot != this->boot;
		this->boot = boot;
	}
	this->mutex->unlock(this->mutex);
	if (restart)
	{	/* not under the mutex: threads holding IKE_SAs may be waiting for it */
		restarted(this);
	}
	/* "expires":[{"dst":"..","hard":true|false,"spi":N},...]: soft = rekey, hard = delete. */
	p = strstr(resp, "\"expires\":[");
	end = p ? strchr(p, ']') : NULL;
	while (p && end && (p = strstr(p, "\"dst\":\"")) && p < end)
	{
		char dst[64];
		host_t *host;
		bool hard;
		uint32_t spi;
		const char *h, *sp;

		if (!json_str(p, "\"dst\":\"", dst, sizeof(dst)) ||
			!(h = strstr(p, "\"hard\":")) || !(sp = strstr(p, "\"spi\":")))
		{
			break;
		}
		hard = strncmp(h + 7, "true", 4) == 0;
		spi = strtoul(sp + 6, NULL, 10);
		p = sp + 6;
		host = host_create_from_string(dst, 0);
		if (host)
		{
			DBG1(DBG_KNL, "kernel-espada: SA %.8x reached its %s lifetime in espada", spi,
				 hard ? "hard" : "soft");
			charon->kernel->expire(charon->kernel, IPPROTO_ESP, htonl(spi), host, hard);
			host->destroy(host);
		}
	}
	/* {"acquires":[{"cpu":0|null,"local":"..","remote":"..","tunnel":".."},...],"boot":N} */
	for (p = strstr(resp, "\"cpu\":"); p; p = strstr(p, "\"cpu\":"))
	{
		kernel_acquire_data_t data = { .cpu = CPU_ID_MAX };
		uint32_t reqid = 0;
		bool pcpu = TRUE;

		p += 6;
		if (strncmp(p, "null", 4) != 0)
		{
			data.cpu = strtoul(p, NULL, 10);
		}
		if (!json_str(p, "\"local\":\"", l, sizeof(l)) ||
			!json_str(p, "\"remote\":\"", r, sizeof(r)))
		{
			break;
		}
		this->mutex->lock(this->mutex);
		for (i = 0; i < this->ntraps; i++)
		{
			if (streq(this->traps[i].local, l) && streq(this->traps[i].remote, r))
			{
				reqid = this->traps[i].reqid;
				pcpu = this->traps[i].pcpu;
			}
		}
		this->mutex->unlock(this->mutex);
		if (reqid && !pcpu && data.cpu != CPU_ID_MAX)
		{	/* the policy wants no per-CPU acquires (an older espada may still raise them) */
			continue;
		}
		if (!reqid)
		{
			DBG1(DBG_KNL, "kernel-espada: acquire for %s...%s: no routed connection "
				 "(start_action = trap) has these endpoints", l, r);
			continue;
		}
		DBG1(DBG_KNL, "kernel-espada: acquire from espada for reqid %u, CPU %s", reqid,
			 data.cpu == CPU_ID_MAX ? "none (fallback SA)" : "given");
		charon->kernel->acquire(charon->kernel, reqid, &data);
	}
	free(resp);
	return JOB_RESCHEDULE_MS(200);
}

METHOD(kernel_ipsec_t, query_policy, status_t,
	private_kernel_espada_ipsec_t *this, kernel_ipsec_policy_id_t *id,
	kernel_ipsec_query_policy_t *data, time_t *use_time)
{
	return NOT_SUPPORTED;
}

METHOD(kernel_ipsec_t, del_policy, status_t,
	private_kernel_espada_ipsec_t *this, kernel_ipsec_policy_id_t *id,
	kernel_ipsec_manage_policy_t *data)
{
	return SUCCESS;
}

METHOD(kernel_ipsec_t, flush_policies, status_t,
	private_kernel_espada_ipsec_t *this)
{
	return SUCCESS;
}

METHOD(kernel_ipsec_t, bypass_socket, bool,
	private_kernel_espada_ipsec_t *this, int fd, int family)
{
	/* IKE reaches charon through espada's TUN, never through an IPsec policy. */
	return TRUE;
}

METHOD(kernel_ipsec_t, enable_udp_decap, bool,
	private_kernel_espada_ipsec_t *this, int fd, int family, uint16_t port)
{
	/* espada decapsulates; the socket sees only IKE (non-ESP marker) and keepalives. */
	return TRUE;
}

METHOD(kernel_ipsec_t, ipsec_destroy, void,
	private_kernel_espada_ipsec_t *this)
{
	/* The acquire poller holds a reference: it frees the object (see poll_acquires). */
	this->mutex->lock(this->mutex);
	this->destroyed = TRUE;
	this->mutex->unlock(this->mutex);
}

static kernel_ipsec_t *kernel_espada_ipsec_create()
{
	private_kernel_espada_ipsec_t *this;

	INIT(this,
		.public = {
			.get_features = _get_features,
			.get_spi = _get_spi,
			.get_cpi = _get_cpi,
			.add_sa = _add_sa,
			.update_sa = _update_sa,
			.query_sa = _query_sa,
			.del_sa = _del_sa,
			.flush_sas = _flush_sas,
			.add_policy = _add_policy,
			.query_policy = _query_policy,
			.del_policy = _del_policy,
			.flush_policies = _flush_policies,
			.bypass_socket = _bypass_socket,
			.enable_udp_decap = _enable_udp_decap,
			.destroy = _ipsec_destroy,
		},
		.socket = strdup(lib->settings->get_str(lib->settings,
						"%s.plugins.kernel-espada.socket", "/run/espada/espada.sock",
						lib->ns)),
		.rng = lib->crypto->create_rng(lib->crypto, RNG_WEAK),
		.mutex = mutex_create(MUTEX_TYPE_DEFAULT),
	);
	if (!this->rng ||
		!this->rng->get_bytes(this->rng, sizeof(this->run), (uint8_t*)&this->run))
	{
		free_ipsec(this);
		return NULL;
	}
	this->run = (this->run >> 12) | 1; /* non-zero, and exact as a JSON number (< 2^53) */
	DBG1(DBG_KNL, "kernel-espada: SAs go to espada at %s", this->socket);
	lib->scheduler->schedule_job_ms(lib->scheduler, (job_t*)callback_job_create(
			(callback_job_cb_t)poll_acquires, this, NULL, (callback_job_cancel_t)return_false),
			1000);
	return &this->public;
}

typedef struct {
	plugin_t plugin;
} private_kernel_espada_plugin_t;

METHOD(plugin_t, get_name, char*,
	private_kernel_espada_plugin_t *this)
{
	return "kernel-espada";
}

METHOD(plugin_t, plugin_get_features, int,
	private_kernel_espada_plugin_t *this, plugin_feature_t *features[])
{
	static plugin_feature_t f[] = {
		PLUGIN_CALLBACK(kernel_ipsec_register, kernel_espada_ipsec_create),
			PLUGIN_PROVIDE(CUSTOM, "kernel-ipsec"),
	};
	*features = f;
	return countof(f);
}

METHOD(plugin_t, destroy, void,
	private_kernel_espada_plugin_t *this)
{
	free(this);
}

PLUGIN_DEFINE(kernel_espada)
{
	private_kernel_espada_plugin_t *this;

	INIT(this,
		.plugin = {
			.get_name = _get_name,
			.get_features = _plugin_get_features,
			.destroy = _destroy,
		},
	);
	return &this->plugin;
}
