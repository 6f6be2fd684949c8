/* Seed 000's shape, for bench/seed_000.py: a proxy's workers opening connections to one upstream.
 *
 * upstream_storm WORKERS SECONDS PORT HELD
 *
 * Listens on 127.0.0.1:PORT (a thread accepts; the first HELD accepted connections are kept, the
 * rest closed at once), opens HELD connections to it and keeps them (the ports they use stay taken
 * towards that destination), then forks WORKERS processes that connect() to it and close, with
 * SO_LINGER 0 (no TIME_WAIT), for SECONDS. Once the held connections are open it prints "held" and
 * waits for a line on stdin, so that a caller can read its counters between the two phases. Then
 * prints "<connects per second> <failed connects>".
 * Run it in a network namespace whose ip_local_port_range is a little larger than HELD. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_WORKERS 64

static int listener;
static long keep;

static void *acceptor(void *arg)
{
    (void)arg;
    for (long i = 0;; i++) {
        int s = accept(listener, NULL, NULL);
        if (s >= 0 && i >= keep)
            close(s);
    }
    return NULL;
}

static double since(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) + (t.tv_nsec - t0->tv_nsec) / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 5)
        return fprintf(stderr, "usage: %s WORKERS SECONDS PORT HELD\n", argv[0]), 2;
    int workers = atoi(argv[1]);
    double seconds = atof(argv[2]);
    keep = atol(argv[4]);
    if (workers < 1 || workers > MAX_WORKERS)
        return fprintf(stderr, "WORKERS: 1 to %d\n", MAX_WORKERS), 2;
    struct rlimit fds = {2 * keep + 1024, 2 * keep + 1024}; /* both ends of each held connection */
    if (setrlimit(RLIMIT_NOFILE, &fds))
        return perror("setrlimit"), 1;
    /* counts[w] and failures[w] of each worker, shared across fork() */
    long *counts = mmap(NULL, 2 * MAX_WORKERS * sizeof(long), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                        -1, 0);
    long *failures = counts + MAX_WORKERS;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3])),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(listener, (struct sockaddr *)&a, sizeof(a)) || listen(listener, 4096))
        return perror("listen"), 1;
    pthread_t th;
    pthread_create(&th, NULL, acceptor, NULL);
    for (long i = 0; i < keep; i++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof(a)))
            return perror("holding connections"), 1;
    }
    printf("held\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof(line), stdin))
        return fprintf(stderr, "no go-ahead on stdin\n"), 1;
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    for (int w = 0; w < workers; w++) {
        if (fork())
            continue;
        struct timespec t0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (long i = 1;; i++) {
            int c = socket(AF_INET, SOCK_STREAM, 0);
            if (connect(c, (struct sockaddr *)&a, sizeof(a)))
                failures[w]++;
            else
                counts[w]++;
            setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
            close(c);
            if (i % 16 == 0 && since(&t0) >= seconds)
                break;
        }
        _exit(0);
    }
    while (wait(NULL) > 0)
        ;
    long n = 0, f = 0;
    for (int w = 0; w < workers; w++) {
        n += counts[w];
        f += failures[w];
    }
    printf("%.1f %ld\n", n / seconds, f);
    return 0;
}
