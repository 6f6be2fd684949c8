/* Lock contention in phases of 10 ms windows of CLOCK_MONOTONIC (the clock of bpf_ktime_get_ns,
 * and so of lockstat's budget windows): T threads modify their own eventfd on one epoll instance
 * (epoll_ctl(EPOLL_CTL_MOD) takes ep->mtx, a mutex, in do_epoll_ctl) from FROM_US to TO_US of
 * every window, and sleep for the rest. A caller that runs just after each window starts is what
 * a stack-walk budget spent on each window's first contentions over-counts. With a fifth argument
 * "pipe", the threads write 64-byte chunks into one pipe that one more thread drains instead
 * (pipe->mutex, a mutex, in anon_pipe_write and anon_pipe_read): another caller, in another
 * phase. Usage: window_storm THREADS SECONDS FROM_US TO_US [pipe]; prints the operations done. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define WINDOW_NS 10000000LL

static int ep, use_pipe, pipefd[2];
static long long end_ns, from_ns, to_ns;
static long long ops[64];

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void *worker(void *arg)
{
    long i = (long)arg;
    int fd = eventfd(0, 0);
    char chunk[64] = {0};
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (!use_pipe && epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev))
        return perror("epoll_ctl add"), (void *)1;
    for (long long t = now_ns(); t < end_ns; t = now_ns()) {
        long long in = t % WINDOW_NS;
        if (in >= from_ns && in < to_ns) {
            if (use_pipe) {
                if (write(pipefd[1], chunk, sizeof(chunk)) < 0)
                    return perror("write"), (void *)1;
            } else {
                ev.events = (ops[i] & 1) ? EPOLLIN : EPOLLOUT;
                epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
            }
            ops[i]++;
        } else { /* sleep to the phase's next start */
            long long next = (t / WINDOW_NS + (in >= to_ns)) * WINDOW_NS + from_ns;
            struct timespec until = {next / 1000000000LL, next % 1000000000LL};
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &until, NULL);
        }
    }
    return NULL;
}

static void *drain(void *arg)
{
    char buf[65536];
    while (read(pipefd[0], buf, sizeof(buf)) > 0)
        ;
    return arg;
}

int main(int argc, char **argv)
{
    int t = argc > 1 ? atoi(argv[1]) : 4;
    double seconds = argc > 2 ? atof(argv[2]) : 2;
    from_ns = (argc > 3 ? atol(argv[3]) : 0) * 1000LL;
    to_ns = (argc > 4 ? atol(argv[4]) : 1000) * 1000LL;
    if (t > 64)
        t = 64;
    use_pipe = argc > 5 && !strcmp(argv[5], "pipe");
    ep = epoll_create1(0);
    pthread_t th[64], reader;
    if (use_pipe) {
        if (pipe(pipefd))
            return perror("pipe"), 1;
        pthread_create(&reader, NULL, drain, NULL);
    }
    end_ns = now_ns() + (long long)(seconds * 1e9);
    for (long i = 0; i < t; i++)
        pthread_create(&th[i], NULL, worker, (void *)i);
    long long total = 0;
    for (int i = 0; i < t; i++) {
        pthread_join(th[i], NULL);
        total += ops[i];
    }
    if (use_pipe) {
        close(pipefd[1]);
        pthread_join(reader, NULL);
    }
    printf("%lld\n", total);
    return 0;
}
