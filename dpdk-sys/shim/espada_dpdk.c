#include <stddef.h>
#include "espada_dpdk.h"
#include <rte_eth_ring.h>
#include <rte_ring.h>
#include <stdio.h>
#include <string.h>

int espada_rte_errno(void) { return rte_errno; }
uint16_t espada_rx_burst(uint16_t p, uint16_t q, struct rte_mbuf **pkts, uint16_t n) { return rte_eth_rx_burst(p, q, pkts, n); }
uint16_t espada_tx_burst(uint16_t p, uint16_t q, struct rte_mbuf **pkts, uint16_t n) { return rte_eth_tx_burst(p, q, pkts, n); }
struct rte_mbuf *espada_mbuf_alloc(struct rte_mempool *mp) { return rte_pktmbuf_alloc(mp); }
void espada_mbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }
int espada_mbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **m, unsigned n) { return rte_pktmbuf_alloc_bulk(mp, m, n); }
void espada_mbuf_free_bulk(struct rte_mbuf **m, unsigned n) { rte_pktmbuf_free_bulk(m, n); }
int espada_thread_register(void) { return rte_thread_register(); }
void espada_mbuf_reset(struct rte_mbuf *m) { rte_pktmbuf_reset(m); }
void espada_thread_unregister(void) { rte_thread_unregister(); }
/* espada reads and writes these fields of the first cache line directly (dataplane's
 * pktbuf.rs mirrors them): the build fails here if DPDK moves them. */
_Static_assert(offsetof(struct rte_mbuf, buf_addr) == 0, "rte_mbuf.buf_addr moved");
_Static_assert(offsetof(struct rte_mbuf, data_off) == 16, "rte_mbuf.data_off moved");
_Static_assert(offsetof(struct rte_mbuf, nb_segs) == 20, "rte_mbuf.nb_segs moved");
_Static_assert(offsetof(struct rte_mbuf, pkt_len) == 36, "rte_mbuf.pkt_len moved");
_Static_assert(offsetof(struct rte_mbuf, data_len) == 40, "rte_mbuf.data_len moved");
_Static_assert(offsetof(struct rte_mbuf, buf_len) == 54, "rte_mbuf.buf_len moved");
_Static_assert(offsetof(struct rte_mbuf, ol_flags) == 24, "rte_mbuf.ol_flags moved");
/* The receive checksum flags pktbuf.rs reads from ol_flags. */
_Static_assert(RTE_MBUF_F_RX_IP_CKSUM_MASK == ((1ULL << 4) | (1ULL << 7)), "IP checksum flags moved");
_Static_assert(RTE_MBUF_F_RX_IP_CKSUM_GOOD == (1ULL << 7), "IP checksum GOOD moved");
_Static_assert(RTE_MBUF_F_RX_L4_CKSUM_MASK == ((1ULL << 3) | (1ULL << 8)), "L4 checksum flags moved");
_Static_assert(RTE_MBUF_F_RX_L4_CKSUM_GOOD == (1ULL << 8), "L4 checksum GOOD moved");
uint8_t *espada_mbuf_data(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, uint8_t *); }
uint32_t espada_mbuf_pkt_len(const struct rte_mbuf *m) { return rte_pktmbuf_pkt_len(m); }
uint16_t espada_mbuf_data_len(const struct rte_mbuf *m) { return rte_pktmbuf_data_len(m); }
uint16_t espada_mbuf_nb_segs(const struct rte_mbuf *m) { return m->nb_segs; }
uint8_t *espada_mbuf_append(struct rte_mbuf *m, uint16_t len) { return (uint8_t *)rte_pktmbuf_append(m, len); }

struct rte_mempool *espada_pool_create(const char *name, unsigned n, uint16_t data_room, int socket) {
    return rte_pktmbuf_pool_create(name, n, 256, 0, data_room, socket);
}

int espada_port_setup(uint16_t port, uint16_t nq, struct rte_mempool *mp, uint16_t nb_desc) {
    struct rte_eth_dev_info info;
    struct rte_eth_conf conf;
    int r;
    memset(&conf, 0, sizeof conf);
    if ((r = rte_eth_dev_info_get(port, &info)) != 0)
        return r;
    uint64_t want = RTE_ETH_RSS_IP | RTE_ETH_RSS_UDP | RTE_ETH_RSS_TCP;
    if (nq > 1 && (info.flow_type_rss_offloads & want)) {
        conf.rxmode.mq_mode = RTE_ETH_MQ_RX_RSS;
        conf.rx_adv_conf.rss_conf.rss_hf = want & info.flow_type_rss_offloads;
    }
    /* The NIC verifies IPv4 and UDP checksums where it can; the worker then trusts its GOOD
     * flags and checks in software only what the NIC did not (virtual PMDs: everything). */
    conf.rxmode.offloads = info.rx_offload_capa & (RTE_ETH_RX_OFFLOAD_IPV4_CKSUM | RTE_ETH_RX_OFFLOAD_UDP_CKSUM);
    if ((r = rte_eth_dev_configure(port, nq, nq, &conf)) != 0)
        return r;
    uint16_t rxd = nb_desc, txd = nb_desc;
    rte_eth_dev_adjust_nb_rx_tx_desc(port, &rxd, &txd);
    int socket = rte_eth_dev_socket_id(port);
    for (uint16_t q = 0; q < nq; q++) {
        if ((r = rte_eth_rx_queue_setup(port, q, rxd, socket, NULL, mp)) != 0)
            return r;
        if ((r = rte_eth_tx_queue_setup(port, q, txd, socket, NULL)) != 0)
            return r;
    }
    if ((r = rte_eth_dev_start(port)) != 0)
        return r;
    /* Only frames to this port's MAC (and broadcast): the worker admits nothing else anyway,
     * and a gateway must not take other hosts' traffic off a shared segment. Some virtual
     * PMDs cannot filter; that is fine, the worker drops and counts. */
    rte_eth_promiscuous_disable(port);
    return 0;
}

int espada_ring_pair(const char *name, uint16_t nq, int socket, uint16_t *port_a, uint16_t *port_b) {
    struct rte_ring *a2b[RTE_MAX_QUEUES_PER_PORT], *b2a[RTE_MAX_QUEUES_PER_PORT];
    char n[64];
    if (nq == 0 || nq > 64)
        return -EINVAL;
    for (uint16_t q = 0; q < nq; q++) {
        snprintf(n, sizeof n, "%s_ab%u", name, q);
        a2b[q] = rte_ring_create(n, 4096, socket, RING_F_SP_ENQ | RING_F_SC_DEQ);
        snprintf(n, sizeof n, "%s_ba%u", name, q);
        b2a[q] = rte_ring_create(n, 4096, socket, RING_F_SP_ENQ | RING_F_SC_DEQ);
        if (a2b[q] == NULL || b2a[q] == NULL)
            return -rte_errno;
    }
    snprintf(n, sizeof n, "%s_a", name);
    int pa = rte_eth_from_rings(n, b2a, nq, a2b, nq, socket);
    snprintf(n, sizeof n, "%s_b", name);
    int pb = rte_eth_from_rings(n, a2b, nq, b2a, nq, socket);
    if (pa < 0 || pb < 0)
        return -rte_errno;
    *port_a = (uint16_t)pa;
    *port_b = (uint16_t)pb;
    return 0;
}

int espada_port_stats(uint16_t port, uint64_t out[6]) {
    struct rte_eth_stats s;
    int r = rte_eth_stats_get(port, &s);
    if (r != 0)
        return r;
    out[0] = s.ipackets; out[1] = s.opackets; out[2] = s.ibytes; out[3] = s.obytes; out[4] = s.imissed; out[5] = s.oerrors;
    return 0;
}

int espada_port_mac(uint16_t port, uint8_t mac[6]) {
    struct rte_ether_addr a;
    int r = rte_eth_macaddr_get(port, &a);
    if (r == 0)
        memcpy(mac, a.addr_bytes, 6);
    return r;
}

int espada_port_link(uint16_t port, uint32_t *speed, int *up) {
    struct rte_eth_link l;
    int r = rte_eth_link_get_nowait(port, &l);
    if (r == 0) { *speed = l.link_speed; *up = l.link_status; }
    return r;
}

struct rte_flow *espada_flow_udp_to_queue(uint16_t port, uint16_t sport, uint16_t dport, uint16_t queue, char *msg, size_t msglen) {
    struct rte_flow_attr attr = { .ingress = 1 };
    struct rte_flow_item_udp spec = { .hdr = { .src_port = rte_cpu_to_be_16(sport), .dst_port = rte_cpu_to_be_16(dport) } };
    struct rte_flow_item_udp mask = { .hdr = { .src_port = 0xffff, .dst_port = 0xffff } };
    struct rte_flow_item pattern[] = {
        { .type = RTE_FLOW_ITEM_TYPE_ETH },
        { .type = RTE_FLOW_ITEM_TYPE_IPV4 },
        { .type = RTE_FLOW_ITEM_TYPE_UDP, .spec = &spec, .mask = &mask },
        { .type = RTE_FLOW_ITEM_TYPE_END },
    };
    struct rte_flow_action_queue q = { .index = queue };
    struct rte_flow_action actions[] = {
        { .type = RTE_FLOW_ACTION_TYPE_QUEUE, .conf = &q },
        { .type = RTE_FLOW_ACTION_TYPE_END },
    };
    struct rte_flow_error err;
    memset(&err, 0, sizeof err);
    struct rte_flow *f = rte_flow_create(port, &attr, pattern, actions, &err);
    if (f == NULL && msg != NULL && msglen > 0)
        snprintf(msg, msglen, "%s", err.message ? err.message : "not supported");
    return f;
}

int espada_flow_destroy(uint16_t port, struct rte_flow *f) {
    struct rte_flow_error err;
    return rte_flow_destroy(port, f, &err);
}
