/* espada's shim over DPDK: plain functions for DPDK's static inline API (rx/tx burst, mbuf
 * helpers) and a few multi-step set-ups, so that bindgen can bind them. */
#ifndef ESPADA_DPDK_H
#define ESPADA_DPDK_H
#include <stdint.h>
#include <stddef.h>
#include <rte_eal.h>
#include <rte_ethdev.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>
#include <rte_flow.h>
#include <rte_errno.h>

int espada_rte_errno(void);
uint16_t espada_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t espada_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
struct rte_mbuf *espada_mbuf_alloc(struct rte_mempool *mp);
void espada_mbuf_free(struct rte_mbuf *m);
/* rte_pktmbuf_alloc_bulk / rte_pktmbuf_free_bulk. */
int espada_mbuf_alloc_bulk(struct rte_mempool *mp, struct rte_mbuf **m, unsigned n);
void espada_mbuf_free_bulk(struct rte_mbuf **m, unsigned n);
/* rte_thread_register / unregister: a worker thread gets an lcore id, so mempool caches work. */
int espada_thread_register(void);
/* rte_pktmbuf_reset: back to an empty one-segment mbuf with the default headroom. */
void espada_mbuf_reset(struct rte_mbuf *m);
void espada_thread_unregister(void);
uint8_t *espada_mbuf_data(struct rte_mbuf *m);
uint32_t espada_mbuf_pkt_len(const struct rte_mbuf *m);
uint16_t espada_mbuf_data_len(const struct rte_mbuf *m);
uint16_t espada_mbuf_nb_segs(const struct rte_mbuf *m);
uint8_t *espada_mbuf_append(struct rte_mbuf *m, uint16_t len);
struct rte_mempool *espada_pool_create(const char *name, unsigned n, uint16_t data_room, int socket);
/* Configures nq RX and TX queues (RSS on IP + UDP/TCP ports when the PMD has it), starts the
 * port, turns promiscuous mode off. Returns 0 or a negative errno. */
int espada_port_setup(uint16_t port, uint16_t nq, struct rte_mempool *mp, uint16_t nb_desc);
/* Two ethdevs joined back to back by nq pairs of rte_rings: what one sends on queue i the
 * other receives on queue i. For tests and the in-process demo. */
int espada_ring_pair(const char *name, uint16_t nq, int socket, uint16_t *port_a, uint16_t *port_b);
int espada_port_stats(uint16_t port, uint64_t out[6]);
int espada_port_mac(uint16_t port, uint8_t mac[6]);
int espada_port_link(uint16_t port, uint32_t *speed_mbps, int *up);
/* rte_flow: UDP src port sport, dst port dport -> queue. Returns the flow or NULL with the
 * PMD's message in msg. */
struct rte_flow *espada_flow_udp_to_queue(uint16_t port, uint16_t sport, uint16_t dport, uint16_t queue, char *msg, size_t msglen);
int espada_flow_destroy(uint16_t port, struct rte_flow *f);
#endif
