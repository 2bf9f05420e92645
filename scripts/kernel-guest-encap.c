/* Holds UDP sockets on port 4500 (IPv4 and IPv6) with UDP_ENCAP_ESPINUDP set, as an IKE daemon
 * does: without one, the Linux kernel does not decapsulate inbound ESP-in-UDP (RFC 3948; over
 * IPv6 since Linux 5.8). Runs until killed. Built statically by scripts/kernel-guest for the
 * test guest; `espada xfrm --encap-socket` does the same on a host with espada installed. */
#include <netinet/in.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef UDP_ENCAP
#define UDP_ENCAP 100
#endif
#ifndef UDP_ENCAP_ESPINUDP
#define UDP_ENCAP_ESPINUDP 2
#endif

int main(void) {
    int t = UDP_ENCAP_ESPINUDP, one = 1;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(4500)};
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 ||
        setsockopt(fd, IPPROTO_UDP, UDP_ENCAP, &t, sizeof t) < 0) {
        perror("encap4500");
        return 1;
    }
    /* IPv6: optional (a kernel without IPv6 still gets its IPv4 socket). */
    int fd6 = socket(AF_INET6, SOCK_DGRAM, 0);
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(4500)};
    if (fd6 < 0 || setsockopt(fd6, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) < 0 ||
        bind(fd6, (struct sockaddr *)&a6, sizeof a6) < 0 ||
        setsockopt(fd6, IPPROTO_UDP, UDP_ENCAP, &t, sizeof t) < 0)
        perror("encap4500 (IPv6)");
    for (;;)
        pause();
}
