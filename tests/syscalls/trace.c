/*
 * A syscall-level tracer for walspan's durability tests, loaded with LD_PRELOAD.
 *
 * It interposes the libc functions CPython's os module calls for the file-system effects that
 * matter to crash consistency (open, write, pwrite, fsync, fdatasync, ftruncate, rename, link,
 * unlink and their *at / *64 / fortified variants) and appends one line per call to the file
 * named by $WALSPAN_SYSCALL_LOG:
 *
 *     <t0> <t1> <pid> <op> key=value ...
 *
 * t0/t1: CLOCK_MONOTONIC nanoseconds just before and just after the real call (the same clock
 * as Python's time.monotonic_ns(), so a test process can write its own marker lines into the
 * same log and order them against these). Paths are absolute and percent-encoded (bytes <= 0x20,
 * >= 0x7f and '%'); a descriptor's path is what /proc/self/fd/N names, its inode is fstat's.
 * Every call is logged with ret= and err= (errno, 0 on success); fsync and fdatasync lines say
 * type=f (regular file), d (directory) or o (other). With $WALSPAN_SYSCALL_DATA
 * set, writes to regular files also carry data=<hex of the bytes written>, so that a test can
 * rebuild every file's content at any point of the history (tests/powerloss_sim.py).
 *
 * Each line goes out with one write(2) to an O_APPEND descriptor: lines of concurrent threads
 * and processes interleave whole. write() calls on pipes, terminals and sockets, and on the log
 * itself (marker lines), are not logged. The descriptor is opened on first use, kept above fd
 * 900 and close-on-exec; exec'd children re-open it because they inherit the environment.
 *
 * Build: cc -shared -fPIC -O2 -o libsyscalltrace.so trace.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define PATH_FIELD (3 * PATH_MAX + 1)

static int log_fd = -1;
static dev_t log_dev;
static ino_t log_ino;
static int data_enabled;
static pthread_once_t log_once = PTHREAD_ONCE_INIT;

static void open_log(void) {
    const char *name = getenv("WALSPAN_SYSCALL_LOG");
    if (name == NULL || *name == '\0')
        return;
    /* the raw system call: our own open() wrapper must not see (and log) it */
    int fd = (int)syscall(SYS_openat, AT_FDCWD, name, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return;
    int high = fcntl(fd, F_DUPFD_CLOEXEC, 900);
    if (high >= 0) {
        syscall(SYS_close, fd);
        fd = high;
    }
    struct stat st;
    if (fstat(fd, &st) == 0) {
        log_dev = st.st_dev;
        log_ino = st.st_ino;
    }
    data_enabled = getenv("WALSPAN_SYSCALL_DATA") != NULL;
    log_fd = fd;
}

static int tracing(void) {
    pthread_once(&log_once, open_log);
    return log_fd >= 0;
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void *real(const char *name) {
    void *f = dlsym(RTLD_NEXT, name);
    if (f == NULL) {
        static const char msg[] = "syscall tracer: a libc symbol is missing\n";
        syscall(SYS_write, 2, msg, sizeof msg - 1);
        abort();
    }
    return f;
}

/* real_<name>: the next definition of <name> (libc's), looked up once */
#define REAL(name) \
    static __typeof__(&name) real_##name; \
    if (real_##name == NULL) \
        real_##name = (__typeof__(&name))real(#name)

static void encode(const char *in, char *out, size_t cap) {
    static const char hex[] = "0123456789abcdef";
    size_t j = 0;
    for (const unsigned char *p = (const unsigned char *)in; *p != '\0' && j + 4 < cap; p++) {
        if (*p <= 0x20 || *p >= 0x7f || *p == '%') {
            out[j++] = '%';
            out[j++] = hex[*p >> 4];
            out[j++] = hex[*p & 15];
        } else {
            out[j++] = (char)*p;
        }
    }
    out[j] = '\0';
}

/* The path an fd names, encoded; "?" if it cannot be read. */
static void fd_path(int fd, char *out) {
    char link[64], target[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0) {
        strcpy(out, "?");
        return;
    }
    target[n] = '\0';
    encode(target, out, PATH_FIELD);
}

/* `path` made absolute against `dirfd` (AT_FDCWD: the working directory), encoded. */
static void abs_path(int dirfd, const char *path, char *out) {
    char full[2 * PATH_MAX];
    if (path == NULL) {
        strcpy(out, "?");
        return;
    }
    if (path[0] == '/') {
        encode(path, out, PATH_FIELD);
        return;
    }
    char base[PATH_MAX];
    if (dirfd == AT_FDCWD) {
        if (getcwd(base, sizeof base) == NULL)
            strcpy(base, "?");
    } else {
        char link[64];
        snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
        ssize_t n = readlink(link, base, sizeof base - 1);
        if (n < 0)
            n = 0;
        base[n] = '\0';
    }
    snprintf(full, sizeof full, "%s/%s", base, path);
    encode(full, out, PATH_FIELD);
}

/* The inode an fd names; *type (if given): 'f' regular file, 'd' directory, 'o' anything else. */
static unsigned long long fd_ino(int fd, char *type) {
    struct stat st;
    if (fstat(fd, &st) != 0) {
        if (type)
            *type = 'o';
        return 0;
    }
    if (type)
        *type = S_ISREG(st.st_mode) ? 'f' : S_ISDIR(st.st_mode) ? 'd' : 'o';
    return (unsigned long long)st.st_ino;
}

static unsigned long long path_ino(int dirfd, const char *path) {
    struct stat st;
    if (path == NULL || fstatat(dirfd, path, &st, AT_SYMLINK_NOFOLLOW) != 0)
        return 0;
    return (unsigned long long)st.st_ino;
}

/* One line: "<t0> <t1> <pid> " + fields + optional " data=<hex>" + "\n", in one write(2). */
static void emit(long long t0, long long t1, const void *data, size_t data_len, const char *fmt, ...) {
    static const char hex[] = "0123456789abcdef";
    char head[4 * PATH_FIELD];
    int saved = errno;
    int n = snprintf(head, sizeof head, "%lld %lld %d ", t0, t1, (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(head + n, sizeof head - (size_t)n, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof head)
        n = (int)sizeof head - 1;
    size_t extra = data != NULL ? 6 + 2 * data_len : 0;
    char *line = malloc((size_t)n + extra + 1);
    if (line != NULL) {
        memcpy(line, head, (size_t)n);
        size_t j = (size_t)n;
        if (data != NULL) {
            memcpy(line + j, " data=", 6);
            j += 6;
            const unsigned char *p = data;
            for (size_t i = 0; i < data_len; i++) {
                line[j++] = hex[p[i] >> 4];
                line[j++] = hex[p[i] & 15];
            }
        }
        line[j++] = '\n';
        syscall(SYS_write, log_fd, line, j);
        free(line);
    }
    errno = saved;
}

/* -- open ---------------------------------------------------------------------------------- */

static int needs_mode(int flags) {
    return (flags & O_CREAT) != 0 || (flags & O_TMPFILE) == O_TMPFILE;
}

static void log_open(long long t0, int dirfd, const char *path, int flags, int existed, int ret, int err) {
    char p[PATH_FIELD];
    abs_path(dirfd, path, p);
    emit(t0, now_ns(), NULL, 0, "open path=%s flags=0x%x created=%d ino=%llu ret=%d err=%d", p, flags,
         ret >= 0 && !existed && (flags & O_CREAT) != 0, ret >= 0 ? fd_ino(ret, NULL) : 0ULL, ret, err);
}

#define OPEN_AT(NAME, REALNAME) \
    int NAME(int dirfd, const char *path, int flags, ...) { \
        mode_t mode = 0; \
        if (needs_mode(flags)) { \
            va_list ap; \
            va_start(ap, flags); \
            mode = va_arg(ap, mode_t); \
            va_end(ap); \
        } \
        REAL(REALNAME); \
        if (!tracing()) \
            return real_##REALNAME(dirfd, path, flags, mode); \
        int existed = path_ino(dirfd, path) != 0; \
        long long t0 = now_ns(); \
        int ret = real_##REALNAME(dirfd, path, flags, mode); \
        int saved = errno, err = ret < 0 ? saved : 0; \
        log_open(t0, dirfd, path, flags, existed, ret, err); \
        errno = saved; \
        return ret; \
    }

OPEN_AT(openat, openat)
OPEN_AT(openat64, openat64)

int open(const char *path, int flags, ...) {
    mode_t mode = 0;
    if (needs_mode(flags)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    return openat(AT_FDCWD, path, flags, mode);
}

int open64(const char *path, int flags, ...) {
    mode_t mode = 0;
    if (needs_mode(flags)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    return openat64(AT_FDCWD, path, flags, mode);
}

/* _FORTIFY_SOURCE builds call these when the flags need no mode */
int __open_2(const char *path, int flags) { return openat(AT_FDCWD, path, flags); }
int __open64_2(const char *path, int flags) { return openat64(AT_FDCWD, path, flags); }
int __openat_2(int dirfd, const char *path, int flags) { return openat(dirfd, path, flags); }
int __openat64_2(int dirfd, const char *path, int flags) { return openat64(dirfd, path, flags); }

/* -- writes -------------------------------------------------------------------------------- */

static int is_log(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 && st.st_dev == log_dev && st.st_ino == log_ino;
}

static void log_write(const char *op, long long t0, int fd, long long off, const void *buf, size_t len, ssize_t ret,
                      int err) {
    char p[PATH_FIELD];
    fd_path(fd, p);
    const void *data = data_enabled && ret > 0 ? buf : NULL;
    emit(t0, now_ns(), data, ret > 0 ? (size_t)ret : 0, "%s fd=%d path=%s ino=%llu off=%lld len=%zu ret=%zd err=%d",
         op, fd, p, fd_ino(fd, NULL), off, len, ret, err);
}

ssize_t write(int fd, const void *buf, size_t len) {
    REAL(write);
    char type = 'o';
    if (!tracing() || (fd_ino(fd, &type), type != 'f') || is_log(fd))
        return real_write(fd, buf, len);
    /* where the bytes land: the end of file for O_APPEND, else the current position */
    long long off = -1;
    int fl = fcntl(fd, F_GETFL);
    struct stat st;
    if (fl >= 0 && (fl & O_APPEND) != 0 && fstat(fd, &st) == 0)
        off = (long long)st.st_size;
    else
        off = (long long)lseek(fd, 0, SEEK_CUR);
    long long t0 = now_ns();
    ssize_t ret = real_write(fd, buf, len);
    int saved = errno, err = ret < 0 ? saved : 0;
    log_write("write", t0, fd, off, buf, len, ret, err);
    errno = saved;
    return ret;
}

#define PWRITE(NAME, OFFT) \
    ssize_t NAME(int fd, const void *buf, size_t len, OFFT off) { \
        REAL(NAME); \
        if (!tracing()) \
            return real_##NAME(fd, buf, len, off); \
        long long t0 = now_ns(); \
        ssize_t ret = real_##NAME(fd, buf, len, off); \
        int saved = errno, err = ret < 0 ? saved : 0; \
        log_write("pwrite", t0, fd, (long long)off, buf, len, ret, err); \
        errno = saved; \
        return ret; \
    }

PWRITE(pwrite, off_t)
PWRITE(pwrite64, off64_t)

#define TRUNCATE(NAME, OFFT) \
    int NAME(int fd, OFFT len) { \
        REAL(NAME); \
        if (!tracing()) \
            return real_##NAME(fd, len); \
        long long t0 = now_ns(); \
        int ret = real_##NAME(fd, len); \
        int saved = errno, err = ret < 0 ? saved : 0; \
        char p[PATH_FIELD]; \
        fd_path(fd, p); \
        emit(t0, now_ns(), NULL, 0, "ftruncate fd=%d path=%s ino=%llu len=%lld ret=%d err=%d", fd, p, \
             fd_ino(fd, NULL), (long long)len, ret, err); \
        errno = saved; \
        return ret; \
    }

TRUNCATE(ftruncate, off_t)
TRUNCATE(ftruncate64, off64_t)

/* -- flushes ------------------------------------------------------------------------------- */

#define SYNC(NAME) \
    int NAME(int fd) { \
        REAL(NAME); \
        if (!tracing()) \
            return real_##NAME(fd); \
        long long t0 = now_ns(); \
        int ret = real_##NAME(fd); \
        int saved = errno, err = ret < 0 ? saved : 0; \
        char p[PATH_FIELD]; \
        fd_path(fd, p); \
        char type = 'o'; \
        unsigned long long ino = fd_ino(fd, &type); \
        emit(t0, now_ns(), NULL, 0, #NAME " fd=%d path=%s ino=%llu type=%c ret=%d err=%d", fd, p, ino, type, \
             ret, err); \
        errno = saved; \
        return ret; \
    }

SYNC(fsync)
SYNC(fdatasync)

/* -- names --------------------------------------------------------------------------------- */

static void log_two_paths(const char *op, long long t0, int olddir, const char *old, int newdir, const char *new,
                          int ret, int err) {
    char a[PATH_FIELD], b[PATH_FIELD];
    abs_path(olddir, old, a);
    abs_path(newdir, new, b);
    emit(t0, now_ns(), NULL, 0, "%s old=%s new=%s ino=%llu ret=%d err=%d", op, a, b,
         ret == 0 ? path_ino(newdir, new) : 0ULL, ret, err);
}

int renameat2(int olddir, const char *old, int newdir, const char *new, unsigned int flags) {
    REAL(renameat2);
    if (!tracing())
        return real_renameat2(olddir, old, newdir, new, flags);
    long long t0 = now_ns();
    int ret = real_renameat2(olddir, old, newdir, new, flags);
    int saved = errno, err = ret < 0 ? saved : 0;
    log_two_paths("rename", t0, olddir, old, newdir, new, ret, err);
    errno = saved;
    return ret;
}

int renameat(int olddir, const char *old, int newdir, const char *new) {
    REAL(renameat);
    if (!tracing())
        return real_renameat(olddir, old, newdir, new);
    long long t0 = now_ns();
    int ret = real_renameat(olddir, old, newdir, new);
    int saved = errno, err = ret < 0 ? saved : 0;
    log_two_paths("rename", t0, olddir, old, newdir, new, ret, err);
    errno = saved;
    return ret;
}

int rename(const char *old, const char *new) { return renameat(AT_FDCWD, old, AT_FDCWD, new); }

int linkat(int olddir, const char *old, int newdir, const char *new, int flags) {
    REAL(linkat);
    if (!tracing())
        return real_linkat(olddir, old, newdir, new, flags);
    long long t0 = now_ns();
    int ret = real_linkat(olddir, old, newdir, new, flags);
    int saved = errno, err = ret < 0 ? saved : 0;
    log_two_paths("link", t0, olddir, old, newdir, new, ret, err);
    errno = saved;
    return ret;
}

int link(const char *old, const char *new) { return linkat(AT_FDCWD, old, AT_FDCWD, new, 0); }

int unlinkat(int dirfd, const char *path, int flags) {
    REAL(unlinkat);
    if (!tracing())
        return real_unlinkat(dirfd, path, flags);
    unsigned long long ino = path_ino(dirfd, path);
    long long t0 = now_ns();
    int ret = real_unlinkat(dirfd, path, flags);
    int saved = errno, err = ret < 0 ? saved : 0;
    char p[PATH_FIELD];
    abs_path(dirfd, path, p);
    emit(t0, now_ns(), NULL, 0, "%s path=%s ino=%llu ret=%d err=%d", (flags & AT_REMOVEDIR) ? "rmdir" : "unlink", p,
         ino, ret, err);
    errno = saved;
    return ret;
}

int unlink(const char *path) { return unlinkat(AT_FDCWD, path, 0); }
