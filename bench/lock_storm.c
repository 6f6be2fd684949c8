/* Lock-contention storm: T threads on one epoll instance, each modifying its own registered
 * eventfd N times (epoll_ctl(EPOLL_CTL_MOD) takes the instance's mutex ep->mtx and its spinlock
 * ep->lock); prints operations per second. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>

static int ep;
static long n;

static void *worker(void *arg)
{
    int fd = eventfd(0, 0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev))
        return perror("epoll_ctl add"), (void *)1;
    for (long i = 0; i < n; i++) {
        ev.events = (i & 1) ? EPOLLIN : EPOLLOUT;
        epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int t = argc > 1 ? atoi(argv[1]) : 4;
    n = argc > 2 ? atol(argv[2]) : 200000;
    ep = epoll_create1(0);
    pthread_t th[64];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < t && i < 64; i++)
        pthread_create(&th[i], NULL, worker, NULL);
    for (int i = 0; i < t && i < 64; i++)
        pthread_join(th[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%.1f\n", t * n / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9));
    return 0;
}
