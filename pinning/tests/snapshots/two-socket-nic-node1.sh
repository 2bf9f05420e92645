#!/bin/sh
# espada pinning plan for gateway "west" (red ens1f0, black ens1f1)
# Review, then run as root, or use `espada pin apply`.
set -e

# Workers: 4 on cores 8-11
#   worker 0 -> core 8
#   worker 1 -> core 9
#   worker 2 -> core 10
#   worker 3 -> core 11
# NOTE: ens1f0 has 16 queues for 4 workers: RSS is limited to queues 0..3
# NOTE: ens1f1 has 16 queues for 4 workers: RSS is limited to queues 0..3

# Queue IRQs (and their receive softirqs) on cores the workers leave free, never a worker's.
echo 12 > /proc/irq/100/smp_affinity_list   # ens1f0 queue 0
echo 13 > /proc/irq/101/smp_affinity_list   # ens1f0 queue 1
echo 14 > /proc/irq/102/smp_affinity_list   # ens1f0 queue 2
echo 15 > /proc/irq/103/smp_affinity_list   # ens1f0 queue 3
echo 12 > /proc/irq/200/smp_affinity_list   # ens1f1 queue 0
echo 13 > /proc/irq/201/smp_affinity_list   # ens1f1 queue 1
echo 14 > /proc/irq/202/smp_affinity_list   # ens1f1 queue 2
echo 15 > /proc/irq/203/smp_affinity_list   # ens1f1 queue 3

# RSS over addresses and UDP ports, so flows spread by port too.
ethtool -N ens1f0 rx-flow-hash udp4 sdfn
ethtool -N ens1f1 rx-flow-hash udp4 sdfn
ethtool -X ens1f0 equal 4   # only the workers' queues
ethtool -X ens1f1 equal 4   # only the workers' queues
ethtool -K ens1f1 ntuple on

# Per-CPU SA steering on the black NIC: the peer's SA i (UDP source port base+i) -> queue i.
ethtool -N ens1f1 flow-type udp4 src-port 4501 dst-port 4500 action 0
ethtool -N ens1f1 flow-type udp4 src-port 4502 dst-port 4500 action 1
ethtool -N ens1f1 flow-type udp4 src-port 4503 dst-port 4500 action 2
ethtool -N ens1f1 flow-type udp4 src-port 4504 dst-port 4500 action 3

# Per-CPU SA table
#   dir  index  spi         udp-sport  core  queue  irq
#   in       0  0x00002001       4501     8      0  200
#   in       1  0x00002002       4502     9      1  201
#   in       2  0x00002003       4503    10      2  202
#   in       3  0x00002004       4504    11      3  203
#   out      0  0x00001001       4501     8      0  200
#   out      1  0x00001002       4502     9      1  201
#   out      2  0x00001003       4503    10      2  202
#   out      3  0x00001004       4504    11      3  203
