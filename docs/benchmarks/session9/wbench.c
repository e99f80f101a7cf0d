// wbench.c: compares write, writev(1) and send of small messages over loopback TCP; reader drains on another CPU
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sched.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <time.h>
#include <sys/resource.h>
static int lfd; static int port;
static void pin(int c){cpu_set_t s;CPU_ZERO(&s);CPU_SET(c,&s);sched_setaffinity(0,sizeof s,&s);}
static void* reader(void*a){pin(1);int fd=accept(lfd,0,0);char b[65536];while(read(fd,b,sizeof b)>0);return 0;}
static double cpu(){struct rusage u;getrusage(RUSAGE_THREAD,&u);return u.ru_utime.tv_sec+u.ru_utime.tv_usec*1e-6+u.ru_stime.tv_sec+u.ru_stime.tv_usec*1e-6;}
int main(int argc,char**argv){int mode=atoi(argv[1]);long n=atol(argv[2]);
 lfd=socket(AF_INET,SOCK_STREAM,0);struct sockaddr_in a={.sin_family=AF_INET,.sin_addr.s_addr=htonl(0x7f000001)};bind(lfd,(void*)&a,sizeof a);listen(lfd,1);socklen_t l=sizeof a;getsockname(lfd,(void*)&a,&l);
 pthread_t t;pthread_create(&t,0,reader,0);pin(0);int fd=socket(AF_INET,SOCK_STREAM,0);connect(fd,(void*)&a,sizeof a);int one=1;setsockopt(fd,IPPROTO_TCP,TCP_NODELAY,&one,sizeof one);
 char msg[100];memset(msg,'x',sizeof msg);struct iovec iov={msg,sizeof msg};
 double c0=cpu();struct timespec w0,w1;clock_gettime(CLOCK_MONOTONIC,&w0);
 for(long i=0;i<n;i++){ssize_t r; if(mode==0)r=write(fd,msg,sizeof msg);else if(mode==1)r=writev(fd,&iov,1);else r=send(fd,msg,sizeof msg,MSG_DONTWAIT);if(r<0){perror("w");return 1;}
  if((i&63)==0){struct timespec d={0,20000};nanosleep(&d,0);} }
 double c1=cpu();clock_gettime(CLOCK_MONOTONIC,&w1);
 printf("%s: %.2f us cpu per call (writer thread, incl. loopback receive softirq)\n",mode==0?"write":mode==1?"writev":"send",(c1-c0)/n*1e6);return 0;}
