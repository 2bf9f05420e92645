#!/bin/sh
# espada pinning plan for gateway "west" (red ens1f0, black ens1f1)
# Review, then run as root, or use `espada pin apply`.
set -e

# Workers: 16 on cores 0-15
#   worker 0 -> core 0
#   worker 1 -> core 1
#   worker 2 -> core 2
#   worker 3 -> core 3
#   worker 4 -> core 4
#   worker 5 -> core 5
#   worker 6 -> core 6
#   worker 7 -> core 7
#   worker 8 -> core 8
#   worker 9 -> core 9
#   worker 10 -> core 10
#   worker 11 -> core 11
#   worker 12 -> core 12
#   worker 13 -> core 13
#   worker 14 -> core 14
#   worker 15 -> core 15

# irqbalance would move the IRQs below again: stop it.
systemctl stop irqbalance || pkill -x irqbalance || true

# Queue IRQs (and their receive softirqs) on cores the workers leave free, never a worker's.
echo 16 > /proc/irq/100/smp_affinity_list   # ens1f0 queue 0
echo 17 > /proc/irq/101/smp_affinity_list   # ens1f0 queue 1
echo 18 > /proc/irq/102/smp_affinity_list   # ens1f0 queue 2
echo 19 > /proc/irq/103/smp_affinity_list   # ens1f0 queue 3
echo 20 > /proc/irq/104/smp_affinity_list   # ens1f0 queue 4
echo 21 > /proc/irq/105/smp_affinity_list   # ens1f0 queue 5
echo 22 > /proc/irq/106/smp_affinity_list   # ens1f0 queue 6
echo 23 > /proc/irq/107/smp_affinity_list   # ens1f0 queue 7
echo 24 > /proc/irq/108/smp_affinity_list   # ens1f0 queue 8
echo 25 > /proc/irq/109/smp_affinity_list   # ens1f0 queue 9
echo 26 > /proc/irq/110/smp_affinity_list   # ens1f0 queue 10
echo 27 > /proc/irq/111/smp_affinity_list   # ens1f0 queue 11
echo 28 > /proc/irq/112/smp_affinity_list   # ens1f0 queue 12
echo 29 > /proc/irq/113/smp_affinity_list   # ens1f0 queue 13
echo 30 > /proc/irq/114/smp_affinity_list   # ens1f0 queue 14
echo 31 > /proc/irq/115/smp_affinity_list   # ens1f0 queue 15
echo 16 > /proc/irq/200/smp_affinity_list   # ens1f1 queue 0
echo 17 > /proc/irq/201/smp_affinity_list   # ens1f1 queue 1
echo 18 > /proc/irq/202/smp_affinity_list   # ens1f1 queue 2
echo 19 > /proc/irq/203/smp_affinity_list   # ens1f1 queue 3
echo 20 > /proc/irq/204/smp_affinity_list   # ens1f1 queue 4
echo 21 > /proc/irq/205/smp_affinity_list   # ens1f1 queue 5
echo 22 > /proc/irq/206/smp_affinity_list   # ens1f1 queue 6
echo 23 > /proc/irq/207/smp_affinity_list   # ens1f1 queue 7
echo 24 > /proc/irq/208/smp_affinity_list   # ens1f1 queue 8
echo 25 > /proc/irq/209/smp_affinity_list   # ens1f1 queue 9
echo 26 > /proc/irq/210/smp_affinity_list   # ens1f1 queue 10
echo 27 > /proc/irq/211/smp_affinity_list   # ens1f1 queue 11
echo 28 > /proc/irq/212/smp_affinity_list   # ens1f1 queue 12
echo 29 > /proc/irq/213/smp_affinity_list   # ens1f1 queue 13
echo 30 > /proc/irq/214/smp_affinity_list   # ens1f1 queue 14
echo 31 > /proc/irq/215/smp_affinity_list   # ens1f1 queue 15

# RSS over addresses and UDP ports, so flows spread by port too.
ethtool -N ens1f0 rx-flow-hash udp4 sdfn
ethtool -N ens1f1 rx-flow-hash udp4 sdfn
ethtool -K ens1f1 ntuple on

# Per-CPU SA steering on the black NIC: the peer's SA i (UDP source port base+i) -> queue i.
ethtool -N ens1f1 flow-type udp4 src-port 4501 dst-port 4500 action 0
ethtool -N ens1f1 flow-type udp4 src-port 4502 dst-port 4500 action 1
ethtool -N ens1f1 flow-type udp4 src-port 4503 dst-port 4500 action 2
ethtool -N ens1f1 flow-type udp4 src-port 4504 dst-port 4500 action 3
ethtool -N ens1f1 flow-type udp4 src-port 4505 dst-port 4500 action 4
ethtool -N ens1f1 flow-type udp4 src-port 4506 dst-port 4500 action 5
ethtool -N ens1f1 flow-type udp4 src-port 4507 dst-port 4500 action 6
ethtool -N ens1f1 flow-type udp4 src-port 4508 dst-port 4500 action 7
ethtool -N ens1f1 flow-type udp4 src-port 4509 dst-port 4500 action 8
ethtool -N ens1f1 flow-type udp4 src-port 4510 dst-port 4500 action 9
ethtool -N ens1f1 flow-type udp4 src-port 4511 dst-port 4500 action 10
ethtool -N ens1f1 flow-type udp4 src-port 4512 dst-port 4500 action 11
ethtool -N ens1f1 flow-type udp4 src-port 4513 dst-port 4500 action 12
ethtool -N ens1f1 flow-type udp4 src-port 4514 dst-port 4500 action 13
ethtool -N ens1f1 flow-type udp4 src-port 4515 dst-port 4500 action 14
ethtool -N ens1f1 flow-type udp4 src-port 4516 dst-port 4500 action 15

# Per-CPU SA table
#   dir  index  spi         udp-sport  core  queue  irq
#   in       0  0x00002001       4501     0      0  200
#   in       1  0x00002002       4502     1      1  201
#   in       2  0x00002003       4503     2      2  202
#   in       3  0x00002004       4504     3      3  203
#   in       4  0x00002005       4505     4      4  204
#   in       5  0x00002006       4506     5      5  205
#   in       6  0x00002007       4507     6      6  206
#   in       7  0x00002008       4508     7      7  207
#   in       8  0x00002009       4509     8      8  208
#   in       9  0x0000200a       4510     9      9  209
#   in      10  0x0000200b       4511    10     10  210
#   in      11  0x0000200c       4512    11     11  211
#   in      12  0x0000200d       4513    12     12  212
#   in      13  0x0000200e       4514    13     13  213
#   in      14  0x0000200f       4515    14     14  214
#   in      15  0x00002010       4516    15     15  215
#   out      0  0x00001001       4501     0      0  200
#   out      1  0x00001002       4502     1      1  201
#   out      2  0x00001003       4503     2      2  202
#   out      3  0x00001004       4504     3      3  203
#   out      4  0x00001005       4505     4      4  204
#   out      5  0x00001006       4506     5      5  205
#   out      6  0x00001007       4507     6      6  206
#   out      7  0x00001008       4508     7      7  207
#   out      8  0x00001009       4509     8      8  208
#   out      9  0x0000100a       4510     9      9  209
#   out     10  0x0000100b       4511    10     10  210
#   out     11  0x0000100c       4512    11     11  211
#   out     12  0x0000100d       4513    12     12  212
#   out     13  0x0000100e       4514    13     13  213
#   out     14  0x0000100f       4515    14     14  214
#   out     15  0x00001010       4516    15     15  215
