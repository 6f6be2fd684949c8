/* Loopback connect()/close() storm for bench/lock_connect_overhead.py: N connections to a local
 * listener, each accepted and both ends closed; prints connects per second. The client sets
 * SO_LINGER 0 so no TIME_WAIT piles up and every connect runs the full port search path. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 100000;
    int srv = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    if (bind(srv, (struct sockaddr *)&a, sizeof(a)) || listen(srv, 1024) ||
        getsockname(srv, (struct sockaddr *)&a, &len))
        return perror("listen"), 1;
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c, (struct sockaddr *)&a, sizeof(a)))
            return perror("connect"), 1;
        int s = accept(srv, NULL, NULL);
        setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        close(c);
        close(s);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%.1f\n", n / ((t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9));
    return 0;
}
