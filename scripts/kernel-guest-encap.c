/* Holds a UDP socket on port 4500 with UDP_ENCAP_ESPINUDP set, as an IKE daemon does: without
 * one, the Linux kernel does not decapsulate inbound ESP-in-UDP (RFC 3948). Runs until killed.
 * Built statically by scripts/kernel-guest for the test guest; `espada xfrm --encap-socket` does
 * the same on a host with espada installed. */
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
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(4500)};
    int t = UDP_ENCAP_ESPINUDP;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 ||
        setsockopt(fd, IPPROTO_UDP, UDP_ENCAP, &t, sizeof t) < 0) {
        perror("encap4500");
        return 1;
    }
    for (;;)
        pause();
}
