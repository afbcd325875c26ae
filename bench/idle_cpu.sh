#!/bin/bash
# CPU of an idle `trustplane serve` (SQLite, 1 worker): settle 12 s, then CPU ticks and context switches over 10 s
# from /proc, with the load average (the machine may be shared).
# usage: bench/idle_cpu.sh <source tree whose src/ to run> <port> (port+1: the operations listener)
WT=$1; PORT=$2
D=$(mktemp -d)
cd "$D"
export PYTHONPATH=$WT/src TRUSTPLANE_DATA_DIR=$D/.trustplane TRUSTPLANE_PORT=$PORT TRUSTPLANE_OPS_PORT=$((PORT+1))
/work/main/.venv/bin/trustplane serve --workers 1 > $D/log 2>&1 &
PID=$!
sleep 12
tck=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/$PID/stat; }
ctx() { awk '/ctxt_switches/{s+=$2} END{print s}' /proc/$PID/task/*/status; }
a=$(cpu); c1=$(ctx); l1=$(cut -d' ' -f1-3 /proc/loadavg)
sleep 10
b=$(cpu); c2=$(ctx); l2=$(cut -d' ' -f1-3 /proc/loadavg)
echo "cpu_ticks=$((b-a)) (CLK_TCK=$tck) cpu%=$(echo "scale=2; ($b-$a)*100/$tck/10" | bc) ctxsw=$((c2-c1)) load_start=[$l1] load_end=[$l2]"
kill $PID; wait $PID 2>/dev/null
tail -3 $D/log | cut -c1-200
rm -rf "$D"
