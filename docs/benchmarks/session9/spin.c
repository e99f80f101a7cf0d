// spin.c: spins on one CPU for argv[1] seconds and sums the gaps of 100 us or more between two clock readings (session 9, docs/benchmarks.md). Build: gcc -O2 -o spin spin.c; run: taskset -c 0 ./spin 10
#include <stdio.h>
#include <time.h>
#include <stdlib.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int c,char**v){double d=atof(v[1]);double s=now(),last=s,tot=0;long g1=0,g5=0;double mx=0;
while(1){double t=now();double g=t-last;if(g>0.0001){tot+=g;if(g>0.001)g1++;if(g>0.005)g5++;if(g>mx)mx=g;}last=t;if(t-s>d)break;}
printf("gaps>100us total %.1f ms (%.2f%%), >1ms %ld, >5ms %ld, max %.2f ms\n",tot*1e3,tot/d*100,g1,g5,mx*1e3);}
