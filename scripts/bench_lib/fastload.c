/*
 * fastload: the bench's target server and connection-heavy load generators, in C.
 *
 * In the VM (qemu TCG) a Python client or target costs more CPU per connection than the
 * proxies under test, and on the host it takes CPU from them; this keeps both out of the way.
 * scripts/bench compiles it with the system C compiler when it can, and falls back to its
 * Python equivalents (bench_lib/target.py, bench_lib/load.py) when it cannot.
 *
 *   fastload serve [--backlog N] [--request N] [--reply N] MODE=ADDR...
 *       MODE: bulk | echo | rr (see bench_lib/target.py: same protocol, same READY line)
 *   fastload pingpong ADDR ROUNDS SIZE
 *   fastload loop ADDR CLIENTS SECONDS REQUEST REPLY MAX [--preamble HEX --expect PREFIX]
 *       (REPLY 0: echo of REQUEST, checked.  --preamble: each connection first sends these bytes
 *       and reads a reply up to and including a blank line, CRLF CRLF, at most 8 KiB, which must
 *       start with PREFIX: an HTTP CONNECT handshake, "HTTP/1.1 200", before the exchange)
 *   fastload burst ADDR CLIENTS SIZE SECONDS
 *
 * ADDR is tcp:HOST:PORT or vsock:CID:PORT.  Clients print one JSON object on stdout.
 * A client refuses AF_VSOCK unless VSOCKPROXY_IN_VM=1: on the host a vsock connect would
 * reach the hypervisor.  Every loop is bounded by time; every socket has 30 s timeouts.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1 << 20)
#define MAX_ERRNO 200

static void die(const char *what) { fprintf(stderr, "fastload: %s: %s\n", what, strerror(errno)); exit(2); }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static const char *errname(int e) {
    const char *name = strerrorname_np(e);
    return name ? name : "EUNKNOWN";
}

/* ------------------------------------------------------------------ addresses */

struct addr { int family; socklen_t len; struct sockaddr_storage ss; };

static int parse_addr(const char *text, struct addr *a) {
    memset(a, 0, sizeof *a);
    char host[128];
    const char *colon = strrchr(text, ':');
    if (!colon) return -1;
    long port = strtol(colon + 1, NULL, 10);
    if (!strncmp(text, "tcp:", 4)) {
        size_t n = colon - (text + 4);
        if (n == 0 || n >= sizeof host) return -1;
        memcpy(host, text + 4, n);
        host[n] = 0;
        struct sockaddr_in *in = (struct sockaddr_in *)&a->ss;
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&a->ss;
        if (inet_pton(AF_INET, host, &in->sin_addr) == 1) {
            a->family = in->sin_family = AF_INET;
            in->sin_port = htons(port);
            a->len = sizeof *in;
        } else if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
            a->family = in6->sin6_family = AF_INET6;
            in6->sin6_port = htons(port);
            a->len = sizeof *in6;
        } else {
            return -1;
        }
        return 0;
    }
    if (!strncmp(text, "vsock:", 6)) {
        struct sockaddr_vm *vm = (struct sockaddr_vm *)&a->ss;
        const char *cid = text + 6;
        a->family = vm->svm_family = AF_VSOCK;
        vm->svm_cid = !strncmp(cid, "any", 3) ? VMADDR_CID_ANY : (unsigned)strtoul(cid, NULL, 10);
        vm->svm_port = port == 0 ? VMADDR_PORT_ANY : (unsigned)port;
        a->len = sizeof *vm;
        return 0;
    }
    return -1;
}

static void format_addr(int fd, char *out, size_t size) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    getsockname(fd, (struct sockaddr *)&ss, &len);
    if (ss.ss_family == AF_VSOCK) {
        struct sockaddr_vm *vm = (struct sockaddr_vm *)&ss;
        snprintf(out, size, "vsock:%u:%u", vm->svm_cid, vm->svm_port);
    } else if (ss.ss_family == AF_INET6) {
        char host[64];
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
        snprintf(out, size, "tcp:%s:%u", host, ntohs(in6->sin6_port));
    } else {
        char host[64];
        struct sockaddr_in *in = (struct sockaddr_in *)&ss;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
        snprintf(out, size, "tcp:%s:%u", host, ntohs(in->sin_port));
    }
}

static void require_vm_for(const struct addr *a) {
    const char *flag = getenv("VSOCKPROXY_IN_VM");
    if (a->family == AF_VSOCK && !(flag && !strcmp(flag, "1"))) {
        fprintf(stderr, "fastload: refusing to connect AF_VSOCK outside scripts/vsock-vm "
                        "(VSOCKPROXY_IN_VM is not 1)\n");
        exit(3);
    }
}

static void set_timeouts(int fd, int seconds) {
    struct timeval tv = {seconds, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static void nodelay(int fd, int family) {
    int one = 1;
    if (family != AF_VSOCK) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* A blocking client socket connected to a (30 s timeouts); -errno on failure. */
static int dial(const struct addr *a) {
    require_vm_for(a);
    int fd = socket(a->family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    set_timeouts(fd, 30);
    if (connect(fd, (const struct sockaddr *)&a->ss, a->len) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    nodelay(fd, a->family);
    return fd;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) { if (errno == EINTR) continue; return -errno; }
        p += w;
        n -= w;
    }
    return 0;
}

/* Read exactly n bytes; returns n, a short count on EOF, or -errno. */
static ssize_t read_exactly(int fd, char *p, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, p + got, n - got);
        if (r < 0) { if (errno == EINTR) continue; return -errno; }
        if (r == 0) break;
        got += r;
    }
    return got;
}

/* ------------------------------------------------------------------ results */

#define WRONG_REPLY (MAX_ERRNO + 1)
#define WRONG_HANDSHAKE (MAX_ERRNO + 2)
/* by errno; then a short or wrong reply, and a handshake reply that is not the one expected */
struct errors { long count[MAX_ERRNO + 3]; };

static void add_error(struct errors *e, int err) {
    if (err != WRONG_HANDSHAKE && (err <= 0 || err > MAX_ERRNO)) err = WRONG_REPLY;
    __atomic_add_fetch(&e->count[err], 1, __ATOMIC_RELAXED);
}

static long print_errors(const struct errors *e) {
    long total = 0;
    int first = 1;
    printf("\"errors\": {");
    for (int i = 1; i <= WRONG_HANDSHAKE; i++) {
        if (!e->count[i]) continue;
        printf("%s\"%s\": %ld", first ? "" : ", ",
               i <= MAX_ERRNO ? errname(i) : i == WRONG_REPLY ? "short or wrong reply" : "handshake refused",
               e->count[i]);
        first = 0;
        total += e->count[i];
    }
    printf("}");
    return total;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(const double *sorted, long n, double fraction) {
    if (n <= 0) return -1;
    long rank = (long)(fraction * n + 0.999999999);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return sorted[rank - 1];
}

static void print_num(const char *key, double value) {
    if (value < 0) printf("\"%s\": null, ", key);
    else printf("\"%s\": %.6f, ", key, value);
}

/* ------------------------------------------------------------------ pingpong */

static int cmd_pingpong(int argc, char **argv) {
    if (argc != 3) return 1;
    struct addr a;
    if (parse_addr(argv[0], &a)) return 1;
    long rounds = atol(argv[1]);
    size_t size = atol(argv[2]);
    char *msg = malloc(size), *buf = malloc(size);
    double *lat = malloc(sizeof(double) * (rounds + 1));
    struct errors errs = {0};
    long done = 0;
    for (size_t i = 0; i < size; i++) msg[i] = (char)(i * 7 + 1);
    int fd = dial(&a);
    if (fd < 0) {
        add_error(&errs, -fd);
    } else {
        double deadline = now() + 60 + rounds * 0.01;
        for (long i = 0; i < rounds + 10; i++) {
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            int w = write_all(fd, msg, size);
            if (w < 0) { add_error(&errs, -w); break; }
            ssize_t r = read_exactly(fd, buf, size);
            if (r < 0) { add_error(&errs, -r); break; }
            if ((size_t)r != size || memcmp(buf, msg, size)) { add_error(&errs, 0); break; }
            clock_gettime(CLOCK_MONOTONIC, &t1);
            if (i >= 10) lat[done++] = (t1.tv_sec - t0.tv_sec) * 1e6 + (t1.tv_nsec - t0.tv_nsec) / 1e3;
            if ((i & 63) == 0 && now() > deadline) { add_error(&errs, ETIME); break; }
        }
        close(fd);
    }
    qsort(lat, done, sizeof *lat, cmp_double);
    printf("{");
    print_num("p50_us", pct(lat, done, 0.5));
    print_num("p99_us", pct(lat, done, 0.99));
    printf("\"rounds\": %ld, ", done);
    long failures = print_errors(&errs);
    printf(", \"failures\": %ld}\n", failures);
    return 0;
}

/* ------------------------------------------------------------------ loop (churn, #413) */

struct loop_shared {
    struct addr a;
    size_t request, reply;
    int echo;
    const char *preamble, *expect;  /* preamble NULL: no handshake */
    size_t preamble_len;
    double stop_at;
    long max;
    long attempts;  /* atomic */
    struct errors errs;
};

struct loop_thread {
    pthread_t thread;
    struct loop_shared *shared;
    double *lat;
    long n, cap;
};

#define HANDSHAKE_MAX 8192

/* Send the preamble and read the reply through its blank line; bytes read past it (the relay's
 * first bytes) go to ``extra``.  Returns how many, -errno, or -WRONG_HANDSHAKE. */
static ssize_t handshake(int fd, const struct loop_shared *s, char *extra, size_t extra_cap) {
    static __thread char head[HANDSHAKE_MAX + 1];
    int w = write_all(fd, s->preamble, s->preamble_len);
    if (w < 0) return w;
    size_t got = 0;
    for (;;) {
        ssize_t r = read(fd, head + got, HANDSHAKE_MAX - got);
        if (r < 0) { if (errno == EINTR) continue; return -errno; }
        if (r == 0) return -WRONG_HANDSHAKE;  /* refused and closed, or cut short */
        size_t scan = got >= 3 ? got - 3 : 0;  /* the terminator may straddle two reads */
        got += r;
        head[got] = 0;
        char *end = memmem(head + scan, got - scan, "\r\n\r\n", 4);
        if (end) {
            size_t header = end + 4 - head, more = got - header;
            if (strncmp(head, s->expect, strlen(s->expect))) return -WRONG_HANDSHAKE;
            if (more > extra_cap) return -WRONG_REPLY;
            memcpy(extra, head + header, more);
            return more;
        }
        if (got == HANDSHAKE_MAX) return -WRONG_HANDSHAKE;
    }
}

static void *loop_client(void *arg) {
    struct loop_thread *t = arg;
    struct loop_shared *s = t->shared;
    size_t want = s->echo ? s->request : s->reply;
    char *msg = malloc(s->request), *buf = malloc(want ? want : 1);
    for (size_t i = 0; i < s->request; i++) msg[i] = (char)(i * 13 + (uintptr_t)t);
    while (now() < s->stop_at && __atomic_add_fetch(&s->attempts, 1, __ATOMIC_RELAXED) <= s->max) {
        double t0 = now();
        int fd = dial(&s->a);
        if (fd < 0) { add_error(&s->errs, -fd); usleep(1000); continue; }
        ssize_t early = 0;  /* reply bytes that came with the handshake's reply */
        if (s->preamble) {
            early = handshake(fd, s, buf, want);
            if (early < 0) {
                close(fd);
                add_error(&s->errs, -early);
                usleep(1000);
                continue;
            }
        }
        int w = write_all(fd, msg, s->request);
        ssize_t r = w < 0 ? w : read_exactly(fd, buf + early, want - early);
        if (r >= 0) r += early;
        close(fd);
        if (r < 0) { add_error(&s->errs, -r); usleep(1000); continue; }
        if ((size_t)r != want || (s->echo && memcmp(buf, msg, want))) { add_error(&s->errs, 0); continue; }
        if (t->n == t->cap) {
            t->cap = t->cap ? t->cap * 2 : 4096;
            t->lat = realloc(t->lat, sizeof(double) * t->cap);
        }
        t->lat[t->n++] = (now() - t0) * 1000.0;
    }
    free(msg);
    free(buf);
    return NULL;
}

static int unhex(const char *hex, char **out, size_t *len) {
    size_t n = strlen(hex);
    if (n % 2) return -1;
    *out = malloc(n / 2 + 1);
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) return -1;
        (*out)[i] = (char)v;
    }
    *len = n / 2;
    return 0;
}

static int cmd_loop(int argc, char **argv) {
    static struct loop_shared s;
    for (; argc > 6; argc -= 2) {  /* options after the six positionals */
        const char *option = argv[argc - 2], *value = argv[argc - 1];
        if (!strcmp(option, "--preamble")) {
            if (unhex(value, (char **)&s.preamble, &s.preamble_len)) return 1;
        } else if (!strcmp(option, "--expect")) {
            s.expect = value;
        } else {
            return 1;
        }
    }
    if (argc != 6 || (s.preamble != NULL) != (s.expect != NULL)) return 1;
    if (parse_addr(argv[0], &s.a)) return 1;
    require_vm_for(&s.a);
    int clients = atoi(argv[1]);
    double seconds = atof(argv[2]);
    s.request = atol(argv[3]);
    s.reply = atol(argv[4]);
    s.echo = s.reply == 0;
    s.max = atol(argv[5]);
    struct loop_thread *threads = calloc(clients, sizeof *threads);
    double start = now();
    s.stop_at = start + seconds;
    for (int i = 0; i < clients; i++) {
        threads[i].shared = &s;
        if (pthread_create(&threads[i].thread, NULL, loop_client, &threads[i])) die("pthread_create");
    }
    long total = 0;
    for (int i = 0; i < clients; i++) {
        pthread_join(threads[i].thread, NULL);
        total += threads[i].n;
    }
    double elapsed = now() - start;
    double *all = malloc(sizeof(double) * (total + 1));
    long k = 0;
    for (int i = 0; i < clients; i++) {
        memcpy(all + k, threads[i].lat, sizeof(double) * threads[i].n);
        k += threads[i].n;
    }
    qsort(all, total, sizeof *all, cmp_double);
    printf("{\"done\": %ld, \"per_s\": %.6f, ", total, total / elapsed);
    print_num("p50_ms", pct(all, total, 0.5));
    print_num("p99_ms", pct(all, total, 0.99));
    long failures = print_errors(&s.errs);
    printf(", \"failures\": %ld}\n", failures);
    return 0;
}

/* ------------------------------------------------------------------ burst */

struct bconn { int fd; int state; size_t off; double t0; };  /* state 0 connecting, 1 echo, 2 done */

static int cmd_burst(int argc, char **argv) {
    if (argc != 4) return 1;
    struct addr a;
    if (parse_addr(argv[0], &a)) return 1;
    require_vm_for(&a);
    int n = atoi(argv[1]);
    size_t size = atol(argv[2]);
    double limit = atof(argv[3]);
    char *msg = malloc(size), *buf = malloc(size);
    for (size_t i = 0; i < size; i++) msg[i] = (char)(i * 3 + 5);
    struct bconn *c = calloc(n, sizeof *c);
    double *connect_ms = malloc(sizeof(double) * (n + 1));
    long connected = 0, ok = 0, refused = 0, failed = 0, pending = 0;
    struct errors errs = {0};
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (int i = 0; i < n; i++) {  /* every socket first, so that the connects go out back to back */
        c[i].fd = socket(a.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c[i].fd < 0) die("socket");
    }
    double start = now();
    for (int i = 0; i < n; i++) {
        c[i].t0 = now();
        int rc = connect(c[i].fd, (struct sockaddr *)&a.ss, a.len);
        int e = rc < 0 ? errno : 0;
        if (rc < 0 && e != EINPROGRESS) {
            if (e == ECONNREFUSED || e == ECONNRESET) refused++; else failed++;
            add_error(&errs, e);
            close(c[i].fd);
            c[i].state = 2;
            continue;
        }
        struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, c[i].fd, &ev);
        pending++;
    }
    double deadline = start + limit;
    struct epoll_event events[256];
    while (pending > 0 && now() < deadline) {
        int m = epoll_wait(ep, events, 256, 100);
        for (int j = 0; j < m; j++) {
            struct bconn *b = &c[events[j].data.u32];
            if (b->state == 0) {
                int e = 0;
                socklen_t len = sizeof e;
                getsockopt(b->fd, SOL_SOCKET, SO_ERROR, &e, &len);
                if (e) {
                    if (e == ECONNREFUSED || e == ECONNRESET) refused++; else failed++;
                    add_error(&errs, e);
                    goto finish;
                }
                connect_ms[connected++] = (now() - b->t0) * 1000.0;
                nodelay(b->fd, a.family);
                if (write(b->fd, msg, size) != (ssize_t)size) { failed++; add_error(&errs, errno); goto finish; }
                b->state = 1;
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = events[j].data.u32};
                epoll_ctl(ep, EPOLL_CTL_MOD, b->fd, &ev);
                continue;
            }
            ssize_t r = read(b->fd, buf + b->off, size - b->off);
            if (r < 0 && errno == EAGAIN) continue;
            if (r <= 0) { failed++; add_error(&errs, r < 0 ? errno : 0); goto finish; }
            b->off += r;
            if (b->off < size) continue;
            ok++;
        finish:
            epoll_ctl(ep, EPOLL_CTL_DEL, b->fd, NULL);
            close(b->fd);
            b->state = 2;
            pending--;
        }
    }
    for (int i = 0; i < n; i++) {
        if (c[i].state != 2) {
            failed++;
            add_error(&errs, ETIME);
            close(c[i].fd);
        }
    }
    double elapsed = now() - start;
    qsort(connect_ms, connected, sizeof *connect_ms, cmp_double);
    printf("{\"refused\": %ld, \"failed\": %ld, \"ok\": %ld, \"seconds\": %.6f, ", refused, failed, ok, elapsed);
    print_num("connect_p99_ms", pct(connect_ms, connected, 0.99));
    print_errors(&errs);
    printf(", \"failures\": %ld}\n", refused + failed);
    return 0;
}

/* ------------------------------------------------------------------ serve */

enum { BULK, ECHO, RR };
enum { S_HEADER, S_UP, S_DOWN, S_REQUEST, S_ECHO, S_DRAIN, S_FLUSH_CLOSE };

struct listener { int fd; int mode; int is_listener; };
struct conn {
    int fd, is_listener, mode, state;
    char header[9];
    size_t header_len;
    uint64_t count, left;
    const char *out;     /* pending output (not owned unless owned != NULL) */
    size_t out_len;
    char *owned;
    char reply8[8];
};

static char scratch[CHUNK];
static char zeros[CHUNK];
static char *reply_bytes;
static size_t request_size = 2048, reply_size = 4096;
static int ep;
static long open_conns;

static void watch(struct conn *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, op, c->fd, &ev);
}

static void drop(struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->owned);
    free(c);
    open_conns--;
}

/* Write pending output; returns 1 when it is all written, 0 to wait for EPOLLOUT, -1 on error. */
static int flush_out(struct conn *c) {
    while (c->out_len) {
        ssize_t w = write(c->fd, c->out, c->out_len);
        if (w < 0) {
            if (errno == EAGAIN) return 0;
            if (errno == EINTR) continue;
            return -1;
        }
        c->out += w;
        c->out_len -= w;
    }
    free(c->owned);
    c->owned = NULL;
    return 1;
}

/* Progress a connection as far as it goes without blocking. */
static void serve_conn(struct conn *c) {
    for (;;) {
        if (c->out_len) {
            int f = flush_out(c);
            if (f < 0) { drop(c); return; }
            if (f == 0) { watch(c, EPOLLOUT, EPOLL_CTL_MOD); return; }
            if (c->state == S_FLUSH_CLOSE) { drop(c); return; }
            watch(c, EPOLLIN, EPOLL_CTL_MOD);
        }
        switch (c->state) {
        case S_HEADER: {
            ssize_t r = read(c->fd, c->header + c->header_len, sizeof c->header - c->header_len);
            if (r < 0 && errno == EAGAIN) return;
            if (r <= 0) { drop(c); return; }
            c->header_len += r;
            if (c->header_len < sizeof c->header) continue;
            uint64_t n = 0;
            for (int i = 1; i < 9; i++) n = (n << 8) | (unsigned char)c->header[i];
            if (c->header[0] == 'U') {
                c->state = S_UP;
                c->count = 0;
            } else if (c->header[0] == 'D') {
                c->state = S_DOWN;
                c->left = n;
                watch(c, EPOLLOUT, EPOLL_CTL_MOD);
            } else {
                drop(c);
                return;
            }
            continue;
        }
        case S_UP: {
            ssize_t r = read(c->fd, scratch, CHUNK);
            if (r < 0 && errno == EAGAIN) return;
            if (r < 0) { drop(c); return; }
            if (r > 0) { c->count += r; continue; }
            for (int i = 0; i < 8; i++) c->reply8[i] = (char)(c->count >> (56 - 8 * i));
            c->out = c->reply8;
            c->out_len = 8;
            c->state = S_FLUSH_CLOSE;
            continue;
        }
        case S_DOWN: {
            if (c->left == 0) {
                shutdown(c->fd, SHUT_WR);
                c->state = S_DRAIN;
                watch(c, EPOLLIN, EPOLL_CTL_MOD);
                continue;
            }
            size_t step = c->left < CHUNK ? c->left : CHUNK;
            ssize_t w = write(c->fd, zeros, step);
            if (w < 0 && errno == EAGAIN) return;
            if (w < 0) { drop(c); return; }
            c->left -= w;
            continue;
        }
        case S_REQUEST: {
            ssize_t r = read(c->fd, scratch, request_size - c->count);
            if (r < 0 && errno == EAGAIN) return;
            if (r <= 0) { drop(c); return; }
            c->count += r;
            if (c->count < request_size) continue;
            c->out = reply_bytes;
            c->out_len = reply_size;
            c->state = S_DRAIN;
            continue;
        }
        case S_ECHO: {
            ssize_t r = read(c->fd, scratch, 65536);
            if (r < 0 && errno == EAGAIN) return;
            if (r <= 0) { drop(c); return; }
            ssize_t w = write(c->fd, scratch, r);
            if (w < 0 && errno != EAGAIN) { drop(c); return; }
            if (w < 0) w = 0;
            if (w < r) {  /* the peer is slow: keep the rest and stop reading until it is out */
                c->owned = malloc(r - w);
                memcpy(c->owned, scratch + w, r - w);
                c->out = c->owned;
                c->out_len = r - w;
            }
            continue;
        }
        case S_DRAIN: {
            ssize_t r = read(c->fd, scratch, CHUNK);
            if (r < 0 && errno == EAGAIN) return;
            if (r <= 0) { drop(c); return; }
            continue;
        }
        default:
            drop(c);
            return;
        }
    }
}

static int cmd_serve(int argc, char **argv) {
    int backlog = 4096;
    signal(SIGPIPE, SIG_IGN);
    ep = epoll_create1(EPOLL_CLOEXEC);
    char ready[4096] = "READY";
    int listeners = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--backlog") && i + 1 < argc) { backlog = atoi(argv[++i]); continue; }
        if (!strcmp(argv[i], "--request") && i + 1 < argc) { request_size = atol(argv[++i]); continue; }
        if (!strcmp(argv[i], "--reply") && i + 1 < argc) { reply_size = atol(argv[++i]); continue; }
        char *eq = strchr(argv[i], '=');
        if (!eq) return 1;
        *eq = 0;
        int mode = !strcmp(argv[i], "bulk") ? BULK : !strcmp(argv[i], "echo") ? ECHO : !strcmp(argv[i], "rr") ? RR : -1;
        struct addr a;
        if (mode < 0 || parse_addr(eq + 1, &a)) return 1;
        int fd = socket(a.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) die("socket");
        int one = 1;
        if (a.family != AF_VSOCK) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&a.ss, a.len) < 0) die("bind");
        if (listen(fd, backlog) < 0) die("listen");
        struct conn *l = calloc(1, sizeof *l);
        l->fd = fd;
        l->is_listener = 1;
        l->mode = mode;
        watch(l, EPOLLIN, EPOLL_CTL_ADD);
        char where[128];
        format_addr(fd, where, sizeof where);
        snprintf(ready + strlen(ready), sizeof ready - strlen(ready), " %s=%s", argv[i], where);
        listeners++;
    }
    if (!listeners) return 1;
    reply_bytes = malloc(reply_size ? reply_size : 1);
    for (size_t i = 0; i < reply_size; i++) reply_bytes[i] = (char)i;
    struct conn stdin_watch = {.fd = 0, .is_listener = 2};
    watch(&stdin_watch, EPOLLIN, EPOLL_CTL_ADD);  /* the bench went away: stdin closes */
    printf("%s\n", ready);
    fflush(stdout);
    struct epoll_event events[512];
    for (;;) {
        int m = epoll_wait(ep, events, 512, -1);
        if (m < 0) { if (errno == EINTR) continue; die("epoll_wait"); }
        for (int j = 0; j < m; j++) {
            struct conn *c = events[j].data.ptr;
            if (c->is_listener == 2) {
                char b[256];
                if (read(0, b, sizeof b) <= 0) return 0;
                continue;
            }
            if (c->is_listener) {
                for (;;) {
                    int fd = accept4(c->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break;  /* EAGAIN, or out of fds for now: the next event retries */
                    struct conn *n = calloc(1, sizeof *n);
                    n->fd = fd;
                    n->mode = c->mode;
                    n->state = c->mode == BULK ? S_HEADER : c->mode == RR ? S_REQUEST : S_ECHO;
                    struct sockaddr_storage ss;
                    socklen_t len = sizeof ss;
                    getsockname(fd, (struct sockaddr *)&ss, &len);
                    nodelay(fd, ss.ss_family);
                    open_conns++;
                    watch(n, EPOLLIN, EPOLL_CTL_ADD);
                }
                continue;
            }
            serve_conn(c);
        }
    }
}

int main(int argc, char **argv) {
    if (argc >= 2) {
        int rc = 1;
        if (!strcmp(argv[1], "serve")) rc = cmd_serve(argc - 2, argv + 2);
        else if (!strcmp(argv[1], "pingpong")) rc = cmd_pingpong(argc - 2, argv + 2);
        else if (!strcmp(argv[1], "loop")) rc = cmd_loop(argc - 2, argv + 2);
        else if (!strcmp(argv[1], "burst")) rc = cmd_burst(argc - 2, argv + 2);
        if (rc != 1) return rc;
    }
    fprintf(stderr, "usage: fastload serve|pingpong|loop|burst ... (see the comment at the top of fastload.c)\n");
    return 1;
}
