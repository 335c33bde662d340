/*
 * slowfsync: make every fsync() and fdatasync() slower, as on network block storage.
 *
 *   gcc -shared -fPIC -O2 -o bench/out/slowfsync.so bench/slowfsync.c -ldl
 *   LD_PRELOAD=bench/out/slowfsync.so SLOWFSYNC_DELAY_US=2000 some-program
 *
 * The real call runs first, then the thread sleeps SLOWFSYNC_DELAY_US microseconds
 * (default 2000). Only the calling thread waits, as it would for a slow disk. SQLite on
 * Linux syncs its WAL with fdatasync(), Python's os.fsync() calls fsync().
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <time.h>

typedef int (*sync_fn)(int);

static long delay_ns(void) {
    static long ns = -1; /* a benign race: every thread computes the same value */
    if (ns < 0) {
        const char *env = getenv("SLOWFSYNC_DELAY_US");
        ns = (env ? atol(env) : 2000L) * 1000L;
    }
    return ns;
}

static void slow_down(void) {
    long ns = delay_ns();
    struct timespec ts = {ns / 1000000000L, ns % 1000000000L};
    int saved = errno;
    while (ns > 0 && nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
    errno = saved;
}

static int call(const char *name, sync_fn *real, int fd) {
    if (!*real)
        *real = (sync_fn)dlsym(RTLD_NEXT, name);
    int rc = (*real)(fd);
    slow_down();
    return rc;
}

int fsync(int fd) {
    static sync_fn real;
    return call("fsync", &real, fd);
}

int fdatasync(int fd) {
    static sync_fn real;
    return call("fdatasync", &real, fd);
}
