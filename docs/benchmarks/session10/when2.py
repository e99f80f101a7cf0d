# when2.py (session 10, docs/benchmarks.md): run: taskset -c 0 nice -n -20 python3 when2.py 20
# 1 ms sleeper: for each wake >1.5 ms late, prints when, how late, and how much of it was waiting on the runqueue (run_delay)
import time, sys
def rd():
    a=open('/proc/thread-self/schedstat').read().split(); return int(a[1])
dur=float(sys.argv[1]); t0=time.monotonic(); end=t0+dur; out=[]
while time.monotonic()<end:
    d0=rd(); t=time.monotonic(); time.sleep(0.001); late=time.monotonic()-t-0.001; d1=rd()
    if late>0.0015: out.append("%.2f:%.1f(rq %.1f)"%(t-t0, late*1e3, (d1-d0)/1e6))
print(" ".join(out))
