/*
 * loadgen: a lean closed-loop HTTP/1.1 load generator for bench/ingest.py.
 *
 *   loadgen run  HOST PORT CONNS REQS_BIN REQS_IDX FIRST COUNT DURATION_S OUT_BIN PROGRESS_EVERY RATE
 *   loadgen sink PORT
 *
 * run:  replays the pre-built raw requests REQS_BIN (offsets in REQS_IDX, N+1 uint64)
 *       from index FIRST, at most COUNT of them, for at most DURATION_S seconds (0 = no
 *       limit), over CONNS keep-alive connections with one request in flight on each.
 *       A connection the server closes (Connection: close, or EOF) is reopened for the
 *       next request; the reconnect counts in that request's latency. Writes one
 *       12-byte record per finished request to OUT_BIN:
 *       uint32 done_us (since start), uint32 latency_us, uint16 status (0 = connection
 *       error, 1 = unfinished at the hard deadline), uint16 reconnected.
 *       Prints "progress DONE ELAPSED_US" every PROGRESS_EVERY requests (0 = never),
 *       and a final "done DONE ELAPSED_US ERRORS RECONNECTS".
 *       RATE 0 is a closed loop: each connection sends its next request as soon as it has
 *       the answer. RATE > 0 paces the requests: request k is due at start + k / RATE and
 *       waits for its time on an idle connection; its latency counts from the time it was
 *       due, so a server that falls behind is not hidden by the generator waiting for it.
 * sink: answers every request with an empty 200, keep-alive: the generator's ceiling.
 *
 * One thread, epoll, level-triggered. Built by bench/ingest.py with gcc -O2.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define RBUF 65536
#define HARD_GRACE_US 60000000ULL /* in-flight requests get 60 s after the end */

typedef struct {
    uint32_t done_us, latency_us;
    uint16_t status, reconnected;
} record_t;

typedef struct {
    int fd;            /* -1 when disconnected */
    int busy;          /* a request is in flight */
    int connecting;
    int reconnected;
    int queued; /* paced mode: on the idle stack */
    int64_t req;
    size_t woff;
    uint64_t t0;
    size_t rlen;
    char rbuf[RBUF];
} conn_t;

/* a parsed response head: hdr_len 0 while the head is incomplete */
typedef struct {
    size_t hdr_len;
    int status, close, chunked, until_eof;
    long clen;
} head_t;

static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000ULL + (uint64_t)ts.tv_nsec / 1000ULL;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static const char *find_crlf2(const char *buf, size_t len) {
    return memmem(buf, len, "\r\n\r\n", 4);
}

/* Parse an HTTP head (request or response). Returns 0 if incomplete. */
static int parse_head(const char *buf, size_t len, head_t *h, int is_response) {
    const char *end = find_crlf2(buf, len);
    memset(h, 0, sizeof(*h));
    h->clen = -1;
    if (!end)
        return 0;
    h->hdr_len = (size_t)(end - buf) + 4;
    if (is_response) {
        if (len < 12 || strncmp(buf, "HTTP/1.", 7) != 0)
            return -1;
        h->status = atoi(buf + 9);
        if (buf[7] == '0')
            h->close = 1;
    }
    const char *line = memchr(buf, '\n', h->hdr_len);
    while (line && line + 1 < end) {
        line++;
        const char *eol = memchr(line, '\n', (size_t)(end + 2 - line));
        size_t n = eol ? (size_t)(eol - line) : 0;
        if (n > 15 && strncasecmp(line, "content-length:", 15) == 0)
            h->clen = atol(line + 15);
        else if (n > 18 && strncasecmp(line, "transfer-encoding:", 18) == 0)
            h->chunked = memmem(line, n, "chunked", 7) != NULL;
        else if (n > 11 && strncasecmp(line, "connection:", 11) == 0) {
            if (memmem(line, n, "close", 5) || memmem(line, n, "Close", 5))
                h->close = 1;
            else if (memmem(line, n, "eep-alive", 9))
                h->close = 0;
        }
        line = eol;
    }
    if (is_response && h->clen < 0 && !h->chunked && h->status != 204 && h->status != 304 &&
        h->status >= 200)
        h->until_eof = 1;
    return 1;
}

/* Bytes a chunked body needs from buf[pos..len): total end offset, or 0 if incomplete. */
static size_t chunked_end(const char *buf, size_t len, size_t pos) {
    for (;;) {
        const char *eol = memmem(buf + pos, len - pos, "\r\n", 2);
        if (!eol)
            return 0;
        long size = strtol(buf + pos, NULL, 16);
        pos = (size_t)(eol - buf) + 2;
        if (size == 0) {
            const char *t = memmem(buf + pos, len - pos, "\r\n", 2); /* no trailers expected */
            return t ? (size_t)(t - buf) + 2 : 0;
        }
        pos += (size_t)size + 2;
        if (pos > len)
            return 0;
    }
}

/* ------------------------------------------------------------------------- run */

static const char *g_reqs;
static const uint64_t *g_idx;
static int g_epfd;
static struct sockaddr_in g_addr;
static int64_t g_next, g_end;
static uint64_t g_start, g_deadline;
static record_t *g_out;
static int64_t g_done, g_errors, g_reconnects, g_progress, g_first;
static double g_rate;
static conn_t **g_idle; /* paced mode: connections waiting for the next request's time */
static int g_nidle;

static void record(conn_t *c, int status) {
    uint64_t t = now_us();
    record_t *r = &g_out[g_done++];
    r->done_us = (uint32_t)(t - g_start);
    r->latency_us = (uint32_t)(t - c->t0);
    r->status = (uint16_t)status;
    r->reconnected = (uint16_t)c->reconnected;
    if (status < 100)
        g_errors++;
    if (g_progress && g_done % g_progress == 0) {
        printf("progress %lld %llu\n", (long long)g_done, (unsigned long long)(t - g_start));
        fflush(stdout);
    }
    c->busy = 0;
}

static void drop(conn_t *c) {
    if (c->fd >= 0) {
        epoll_ctl(g_epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->connecting = 0;
    c->rlen = 0;
}

static void set_events(conn_t *c, uint32_t ev) {
    struct epoll_event e = {.events = ev, .data.ptr = c};
    if (epoll_ctl(g_epfd, EPOLL_CTL_MOD, c->fd, &e) < 0)
        die("epoll_ctl mod");
}

static int open_conn(conn_t *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    c->fd = fd;
    c->rlen = 0;
    struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(g_epfd, EPOLL_CTL_ADD, fd, &e) < 0)
        die("epoll_ctl add");
    if (connect(fd, (struct sockaddr *)&g_addr, sizeof(g_addr)) < 0 && errno != EINPROGRESS)
        return -1;
    c->connecting = 1;
    g_reconnects++;
    return 0;
}

/* Write what is left of the current request; 1 when all is written. */
static int write_some(conn_t *c) {
    const char *p = g_reqs + g_idx[c->req];
    size_t len = (size_t)(g_idx[c->req + 1] - g_idx[c->req]);
    while (c->woff < len) {
        ssize_t n = send(c->fd, p + c->woff, len - c->woff, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN)
                return 0;
            return -1;
        }
        c->woff += (size_t)n;
    }
    return 1;
}

static void fail(conn_t *c) {
    drop(c);
    record(c, 0);
}

static void start_next(conn_t *c);

static void after_write(conn_t *c) {
    int w = write_some(c);
    if (w < 0)
        fail(c);
    else
        set_events(c, w ? EPOLLIN : EPOLLIN | EPOLLOUT);
}

static uint64_t due_us(int64_t req) {
    return g_start + (uint64_t)((double)(req - g_first) * 1e6 / g_rate);
}

static int more_to_send(uint64_t t) {
    return g_next < g_end && !(g_deadline && t >= g_deadline);
}

static void start_next(conn_t *c) {
    uint64_t t = now_us();
    if (!more_to_send(t))
        return;
    if (g_rate > 0 && t < due_us(g_next)) {
        if (!c->queued)
            g_idle[g_nidle++] = c;
        c->queued = 1;
        return;
    }
    c->t0 = g_rate > 0 ? due_us(g_next) : t;
    c->req = g_next++;
    c->busy = 1;
    c->woff = 0;
    c->rlen = 0;
    c->reconnected = 0;
    if (c->fd < 0) {
        c->reconnected = 1;
        if (open_conn(c) < 0)
            fail(c);
        return;
    }
    after_write(c);
}

/* Is the response in c->rbuf complete? Sets status and close_after; eof: the peer closed. */
static int response_done(conn_t *c, int eof, int *status, int *close_after) {
    head_t h;
    int r = parse_head(c->rbuf, c->rlen, &h, 1);
    if (r < 0)
        return -1;
    if (r == 0)
        return eof ? -1 : 0;
    *status = h.status;
    *close_after = h.close || eof;
    size_t need;
    if (h.clen >= 0)
        need = h.hdr_len + (size_t)h.clen;
    else if (h.chunked)
        need = chunked_end(c->rbuf, c->rlen, h.hdr_len);
    else if (h.until_eof) {
        *close_after = 1;
        return eof ? 1 : 0;
    } else
        need = h.hdr_len;
    if (need == 0 || c->rlen < need)
        return eof ? -1 : 0;
    return 1;
}

static void on_readable(conn_t *c) {
    int eof = 0;
    for (;;) {
        if (c->rlen >= RBUF) {
            fail(c);
            return;
        }
        ssize_t n = recv(c->fd, c->rbuf + c->rlen, RBUF - c->rlen, 0);
        if (n > 0) {
            c->rlen += (size_t)n;
            continue;
        }
        if (n == 0)
            eof = 1;
        else if (errno != EAGAIN) {
            if (c->busy)
                fail(c);
            else
                drop(c);
            return;
        }
        break;
    }
    if (!c->busy) { /* idle keep-alive connection closed or spoke: drop it */
        drop(c);
        return;
    }
    int status = 0, close_after = 0;
    int r = response_done(c, eof, &status, &close_after);
    if (r == 0)
        return;
    if (r < 0) {
        fail(c);
        return;
    }
    if (close_after)
        drop(c);
    c->rlen = 0;
    record(c, status);
}

static void on_event(conn_t *c, uint32_t ev) {
    if (c->connecting) {
        int err = 0;
        socklen_t l = sizeof(err);
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) {
            fail(c);
            return;
        }
        c->connecting = 0;
        after_write(c);
        return;
    }
    if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
        on_readable(c);
        return;
    }
    if ((ev & EPOLLOUT) && c->busy)
        after_write(c);
}

static const void *map_file(const char *path, size_t *len) {
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        die(path);
    struct stat st;
    fstat(fd, &st);
    *len = (size_t)st.st_size;
    void *p = mmap(NULL, *len ? *len : 1, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    if (p == MAP_FAILED)
        die("mmap");
    close(fd);
    return p;
}

static int cmd_run(char **argv) {
    int nconns = atoi(argv[2]);
    size_t blen, ilen;
    g_reqs = map_file(argv[3], &blen);
    g_idx = map_file(argv[4], &ilen);
    int64_t nreqs = (int64_t)(ilen / 8) - 1;
    g_next = atoll(argv[5]);
    int64_t count = atoll(argv[6]);
    double duration = atof(argv[7]);
    const char *out_path = argv[8];
    g_progress = atoll(argv[9]);
    g_rate = atof(argv[10]);
    g_first = g_next;
    g_end = g_next + count < nreqs ? g_next + count : nreqs;
    if (g_next >= g_end) {
        fprintf(stderr, "loadgen: no requests in [%s, +%s)\n", argv[5], argv[6]);
        return 2;
    }
    memset(&g_addr, 0, sizeof(g_addr));
    g_addr.sin_family = AF_INET;
    g_addr.sin_port = htons((uint16_t)atoi(argv[1]));
    if (inet_pton(AF_INET, argv[0], &g_addr.sin_addr) != 1)
        die("inet_pton");
    g_out = calloc((size_t)(g_end - g_next), sizeof(record_t));
    conn_t *conns = calloc((size_t)nconns, sizeof(conn_t));
    g_idle = calloc((size_t)nconns, sizeof(conn_t *));
    g_epfd = epoll_create1(EPOLL_CLOEXEC);
    if (!g_out || !conns || g_epfd < 0)
        die("setup");
    g_start = now_us();
    g_deadline = duration > 0 ? g_start + (uint64_t)(duration * 1e6) : 0;
    uint64_t hard = (g_deadline ? g_deadline : UINT64_MAX - HARD_GRACE_US) + HARD_GRACE_US;
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = -1;
        start_next(&conns[i]);
    }
    struct epoll_event evs[256];
    for (;;) {
        int busy = 0;
        for (int i = 0; i < nconns; i++)
            busy += conns[i].busy;
        uint64_t t = now_us();
        int waiting = g_nidle > 0 && more_to_send(t);
        if ((!busy && !waiting) || t > hard)
            break;
        int timeout = 100;
        if (waiting) {
            uint64_t due = due_us(g_next);
            timeout = due <= t ? 0 : (int)((due - t + 999) / 1000);
            timeout = timeout > 100 ? 100 : timeout;
        }
        int n = epoll_wait(g_epfd, evs, 256, timeout);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            on_event(c, evs[i].events);
            if (!c->busy && !c->queued)
                start_next(c);
        }
        while (g_nidle > 0 && more_to_send(now_us()) && now_us() >= due_us(g_next)) {
            conn_t *c = g_idle[--g_nidle];
            c->queued = 0;
            start_next(c);
        }
    }
    for (int i = 0; i < nconns; i++)
        if (conns[i].busy)
            record(&conns[i], 1); /* unfinished at the hard deadline */
    uint64_t elapsed = now_us() - g_start;
    FILE *f = fopen(out_path, "wb");
    if (!f || fwrite(g_out, sizeof(record_t), (size_t)g_done, f) != (size_t)g_done || fclose(f))
        die(out_path);
    printf("done %lld %llu %lld %lld\n", (long long)g_done, (unsigned long long)elapsed,
           (long long)g_errors, (long long)g_reconnects);
    return 0;
}

/* ------------------------------------------------------------------------ sink */

static const char OK[] = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";

typedef struct {
    int fd;
    size_t rlen;
    char rbuf[RBUF];
} sconn_t;

static void sink_serve(sconn_t *s) {
    for (;;) {
        ssize_t n = recv(s->fd, s->rbuf + s->rlen, RBUF - s->rlen, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN) || (n > 0 && s->rlen + (size_t)n >= RBUF)) {
            close(s->fd);
            free(s);
            return;
        }
        if (n < 0)
            return;
        s->rlen += (size_t)n;
        for (;;) {
            head_t h;
            if (parse_head(s->rbuf, s->rlen, &h, 0) <= 0)
                break;
            size_t need = h.hdr_len + (size_t)(h.clen > 0 ? h.clen : 0);
            if (s->rlen < need)
                break;
            if (send(s->fd, OK, sizeof(OK) - 1, MSG_NOSIGNAL) < 0)
                break;
            memmove(s->rbuf, s->rbuf + need, s->rlen - need);
            s->rlen -= need;
        }
    }
}

static int cmd_sink(char **argv) {
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[0]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(lfd, 1024) < 0)
        die("bind/listen");
    int ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &e);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr) {
                sink_serve(evs[i].data.ptr);
                continue;
            }
            int fd;
            while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                sconn_t *s = calloc(1, sizeof(sconn_t));
                s->fd = fd;
                struct epoll_event ce = {.events = EPOLLIN, .data.ptr = s};
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ce);
            }
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 13 && strcmp(argv[1], "run") == 0)
        return cmd_run(argv + 2);
    if (argc == 3 && strcmp(argv[1], "sink") == 0)
        return cmd_sink(argv + 2);
    fprintf(stderr, "usage: loadgen run HOST PORT CONNS REQS_BIN REQS_IDX FIRST COUNT "
                    "DURATION_S OUT_BIN PROGRESS_EVERY RATE | loadgen sink PORT\n");
    return 2;
}
