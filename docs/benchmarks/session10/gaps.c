// gaps.c (session 10, docs/benchmarks.md): spins on one CPU and prints when (s since start) it lost 1 ms or more, and how long. Build: gcc -O2 -o gaps gaps.c; run: taskset -c 0 nice -n -20 ./gaps 10
#include <stdio.h>
#include <time.h>
#include <stdlib.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int c,char**v){double d=atof(v[1]),t0=now(),last=t0;while(1){double t=now();if(t-last>0.001)printf("%.3f:%.1f ",last-t0,(t-last)*1e3);last=t;if(t-t0>d)break;}printf("\n");return 0;}
