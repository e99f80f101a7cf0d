# jitter.py: sleeps 1 ms over and over for argv[1] seconds and prints how late it woke (session 9, docs/benchmarks.md). Run: taskset -c 0 python3 jitter.py 15
import time, sys
dur=float(sys.argv[1]); lat=[]
end=time.monotonic()+dur
while time.monotonic()<end:
    t=time.monotonic(); time.sleep(0.001); lat.append(time.monotonic()-t-0.001)
lat.sort(); n=len(lat)
print("n",n,"p50 %.3f p99 %.3f p99.9 %.3f max %.3f ms"%(lat[n//2]*1e3,lat[int(n*.99)]*1e3,lat[int(n*.999)]*1e3,lat[-1]*1e3), "over1ms",sum(1 for x in lat if x>0.001),"over5ms",sum(1 for x in lat if x>0.005))
