/*
 * /usr/bin/grove-disktool of Grove's default image: block device throughput and crash-safety
 * helper for the VMM's virtio-blk tests and benchmarks. One process does all the work, so the
 * guest pays for one exec instead of a shell loop of dd/sync processes (each ~0.5 s under the
 * emulated guest kernel of Grove's CI hosts).
 *
 *   grove-disktool bench DEVICE MODE SIZE_MIB [BLOCK_KIB]
 *       MODE: seq-read | seq-write | rand-read | rand-write. Transfers SIZE_MIB MiB in blocks
 *       of BLOCK_KIB KiB (default 4) with O_DIRECT: seq walks the first SIZE_MIB MiB in order,
 *       rand does as many blocks at block-aligned offsets within them from a fixed-seed
 *       xorshift64 generator. Writes fill every 8-byte word with 0x4756 << 48 | block index
 *       ("GV" in the top bytes, so block 0 is not all zeros) and end with one fdatasync,
 *       inside the timing. Prints one line:
 *       GROVE-DISKTOOL mode=M bytes=N block=B seconds=S.SSSSSS mib_per_s=X.XX iops=Y.Y
 *   grove-disktool fsync-loop DEVICE START COUNT
 *       For i = START .. START+COUNT-1 (COUNT 0: until an error, such as the device end):
 *       writes record i (below) at byte i*4096 with O_DIRECT, fdatasync, and only then prints
 *       "ACK i". Any error: a message on stderr, exit 1.
 *   grove-disktool verify DEVICE START COUNT
 *       Checks that blocks START .. START+COUNT-1 hold exactly their records. Prints
 *       "VERIFY-OK COUNT", or "VERIFY-BAD i" for the first bad block and exits 1.
 *
 *   grove-disktool dirty SIZE_MIB RATE_KIB SECONDS
 *       Memory load for live-snapshot tests and benchmarks: allocates SIZE_MIB MiB, writes every
 *       page once (then prints "DIRTY-READY pages=N"), then writes one word of the next page (round robin) at RATE_KIB KiB of pages
 *       per second (0: as fast as it can) for SECONDS seconds (0: for ever). It reads the
 *       monotonic clock between batches, so a gap between two reads is a time it did not run
 *       (the VM paused, or its vCPU not scheduled). Once a second it prints
 *       "DIRTY t=T pages=P max_gap_us=G": the pages written and the largest gap in that second.
 *
 * Record i (4096 bytes): "GROVE-REC", i as 16 lowercase hex digits, then '\n' up to byte 32;
 * bytes 32..4095 are all (i * 31 + 0xa5) & 0xff.
 *
 * Exit status: 0 done, 1 I/O error or bad record, 2 bad arguments (one usage line on stderr).
 * When DEVICE cannot be opened with O_DIRECT (EINVAL: a file on tmpfs, say), it is opened
 * without it. Built like /sbin/init: static, no libc, system calls only. So the buffer comes
 * from mmap (page aligned) rather than posix_memalign, and output goes straight to write(2):
 * nothing is buffered, an ACK line is out when the write returns.
 */
typedef unsigned long u64;
typedef long i64;

#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_mmap 9
#define SYS_pread64 17
#define SYS_pwrite64 18
#define SYS_fdatasync 75
#define SYS_clock_gettime 228
#define SYS_exit_group 231
#define O_RDONLY 0
#define O_RDWR 2
#define O_DIRECT 040000
#define O_CLOEXEC 02000000
#define PROT_READ 1
#define PROT_WRITE 2
#define MAP_PRIVATE 2
#define MAP_ANONYMOUS 0x20
#define CLOCK_MONOTONIC 1
#define EINTR 4
#define EINVAL 22
#define EIO 5
#define REC 4096
#define BENCH_TAG (0x4756UL << 48) /* "GV": bench blocks are never all zeros */
#define MAX_BLOCK_KIB 65536
#define MAX_SIZE_MIB (1UL << 30)
#define MAX_RECORD (1UL << 50)
#define NONE ((u64)-1) /* no number in a die() message */
#define USAGE                                                                                   \
    "usage: grove-disktool bench DEVICE seq-read|seq-write|rand-read|rand-write SIZE_MIB "     \
    "[BLOCK_KIB] | fsync-loop DEVICE START COUNT | verify DEVICE START COUNT | "                \
    "dirty SIZE_MIB RATE_KIB SECONDS\n"

static i64 sys(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f) {
    i64 ret;
    register i64 r10 __asm__("r10") = d;
    register i64 r8 __asm__("r8") = e;
    register i64 r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

static __attribute__((noreturn)) void quit(int status) {
    for (;;) sys(SYS_exit_group, status, 0, 0, 0, 0, 0);
}

static i64 len(const char *s) {
    i64 n = 0;
    while (s[n]) n++;
    return n;
}

static int eq(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

/* Writes all of buf to fd; 0 or -errno. */
static i64 put(int fd, const char *buf, i64 n) {
    while (n > 0) {
        i64 r = sys(SYS_write, fd, (i64)buf, n, 0, 0, 0);
        if (r == -EINTR) continue;
        if (r <= 0) return r < 0 ? r : -EIO;
        buf += r, n -= r;
    }
    return 0;
}

/* A line being assembled: text, decimal and fixed-point numbers. */
struct line {
    char text[256];
    i64 n;
};

static void add(struct line *l, const char *s) {
    while (*s && l->n < (i64)sizeof(l->text)) l->text[l->n++] = *s++;
}

static void add_u64(struct line *l, u64 v) {
    char digits[20];
    int n = 0;
    do digits[n++] = (char)('0' + v % 10), v /= 10; while (v);
    while (n && l->n < (i64)sizeof(l->text)) l->text[l->n++] = digits[--n];
}

/* v / 10^places, printed with exactly `places` decimals. */
static void add_fixed(struct line *l, u64 v, int places) {
    char frac[8];
    for (int i = places - 1; i >= 0; i--) frac[i] = (char)('0' + v % 10), v /= 10;
    frac[places] = 0;
    add_u64(l, v);
    add(l, ".");
    add(l, frac);
}

static __attribute__((noreturn)) void die(const char *what, u64 n, i64 err);

/* Prints the line on fd 1 (a failure there is fatal) or fd 2 (best effort). */
static void out(struct line *l, int fd) {
    i64 r = put(fd, l->text, l->n);
    if (r < 0 && fd == 1) die("cannot write to stdout", NONE, -r);
}

static __attribute__((noreturn)) void usage(void) {
    put(2, USAGE, len(USAGE));
    quit(2);
}

/* "grove-disktool: <what> [<n>][: errno <err>]\n" on stderr, exit 1. */
static __attribute__((noreturn)) void die(const char *what, u64 n, i64 err) {
    struct line l;
    l.n = 0;
    add(&l, "grove-disktool: ");
    add(&l, what);
    if (n != NONE) add(&l, " "), add_u64(&l, n);
    if (err > 0) add(&l, ": errno "), add_u64(&l, (u64)err);
    if (err == 22) add(&l, " (EINVAL)");
    if (err == 28) add(&l, " (ENOSPC)");
    if (err == 5) add(&l, " (EIO)");
    if (err == 2) add(&l, " (ENOENT)");
    if (err == 30) add(&l, " (EROFS)");
    add(&l, "\n");
    out(&l, 2);
    quit(1);
}

/* Decimal, no sign, at most `max`; anything else is a usage error. */
static u64 number(const char *s, u64 max) {
    u64 v = 0;
    if (!*s) usage();
    for (; *s; s++) {
        if (*s < '0' || *s > '9') usage();
        if (v > (max - (u64)(*s - '0')) / 10) usage();
        v = v * 10 + (u64)(*s - '0');
    }
    return v;
}

static int open_device(const char *path, int writing) {
    i64 flags = (writing ? O_RDWR : O_RDONLY) | O_CLOEXEC;
    i64 fd;
    do fd = sys(SYS_open, (i64)path, flags | O_DIRECT, 0, 0, 0, 0); while (fd == -EINTR);
    if (fd == -EINVAL) {
        do fd = sys(SYS_open, (i64)path, flags, 0, 0, 0, 0); while (fd == -EINTR);
    }
    if (fd < 0) die("cannot open the device", NONE, -fd);
    return (int)fd;
}

static unsigned char *buffer(u64 size) {
    i64 p = sys(SYS_mmap, 0, (i64)size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
                0);
    if (p < 0) die("cannot allocate a buffer, bytes", size, -p);
    return (unsigned char *)p;
}

/* Transfers the whole block at `offset`; a short transfer continues, the device end
 * (0 bytes) or an error stops the program, naming `index`. */
static void transfer(int fd, int writing, unsigned char *buf, u64 size, u64 offset, u64 index) {
    u64 done = 0;
    while (done < size) {
        i64 r = sys(writing ? SYS_pwrite64 : SYS_pread64, fd, (i64)(buf + done),
                    (i64)(size - done), (i64)(offset + done), 0, 0);
        if (r == -EINTR) continue;
        if (r < 0) die(writing ? "write failed at block" : "read failed at block", index, -r);
        if (r == 0) die("device end reached at block", index, 0);
        done += (u64)r;
    }
}

static void sync_device(int fd) {
    i64 r;
    do r = sys(SYS_fdatasync, fd, 0, 0, 0, 0, 0); while (r == -EINTR);
    if (r < 0) die("fdatasync failed", NONE, -r);
}

static u64 now_ns(void) {
    i64 ts[2];
    i64 r = sys(SYS_clock_gettime, CLOCK_MONOTONIC, (i64)ts, 0, 0, 0, 0);
    if (r < 0) die("clock_gettime failed", NONE, -r);
    return (u64)ts[0] * 1000000000UL + (u64)ts[1];
}

static void bench(char **argv, int argc) {
    const char *mode = argv[3];
    int writing, random;
    if (eq(mode, "seq-read")) writing = 0, random = 0;
    else if (eq(mode, "seq-write")) writing = 1, random = 0;
    else if (eq(mode, "rand-read")) writing = 0, random = 1;
    else if (eq(mode, "rand-write")) writing = 1, random = 1;
    else usage();
    u64 size = number(argv[4], MAX_SIZE_MIB) << 20;
    u64 block = (argc == 6 ? number(argv[5], MAX_BLOCK_KIB) : 4) << 10;
    if (size == 0 || block == 0 || size % block) usage();
    u64 blocks = size / block;

    int fd = open_device(argv[2], writing);
    unsigned char *buf = buffer(block);
    u64 *words = (u64 *)(void *)buf;
    u64 x = 0x9e3779b97f4a7c15UL;
    u64 start = now_ns();
    for (u64 i = 0; i < blocks; i++) {
        u64 index = i;
        if (random) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            index = x % blocks;
        }
        if (writing)
            for (u64 w = 0; w < block / 8; w++) words[w] = BENCH_TAG | index;
        transfer(fd, writing, buf, block, index * block, index);
    }
    if (writing) sync_device(fd);
    u64 ns = now_ns() - start;
    if (ns == 0) ns = 1;
    i64 closed = sys(SYS_close, fd, 0, 0, 0, 0, 0);
    if (closed < 0) die("close failed", NONE, -closed);

    double seconds = (double)ns / 1e9;
    struct line l;
    l.n = 0;
    add(&l, "GROVE-DISKTOOL mode="), add(&l, mode);
    add(&l, " bytes="), add_u64(&l, size);
    add(&l, " block="), add_u64(&l, block);
    add(&l, " seconds="), add_fixed(&l, (ns + 500) / 1000, 6);
    add(&l, " mib_per_s="), add_fixed(&l, (u64)((double)size / 1048576.0 / seconds * 100 + 0.5), 2);
    add(&l, " iops="), add_fixed(&l, (u64)((double)blocks / seconds * 10 + 0.5), 1);
    add(&l, "\n");
    out(&l, 1);
}

/* Fills buf with record i. */
static void record(unsigned char *buf, u64 i) {
    static const char hex[] = "0123456789abcdef";
    const char *tag = "GROVE-REC";
    int n = 0;
    while (tag[n]) buf[n] = (unsigned char)tag[n], n++;
    for (int d = 15; d >= 0; d--) buf[n++] = (unsigned char)hex[(i >> (4 * d)) & 0xf];
    while (n < 32) buf[n++] = '\n';
    unsigned char fill = (unsigned char)((i * 31 + 0xa5) & 0xff);
    while (n < REC) buf[n++] = fill;
}

static void fsync_loop(char **argv) {
    u64 first = number(argv[3], MAX_RECORD);
    u64 count = number(argv[4], MAX_RECORD);
    u64 end = count ? first + count : MAX_RECORD;
    int fd = open_device(argv[2], 1);
    unsigned char *buf = buffer(REC);
    for (u64 i = first; i < end; i++) {
        record(buf, i);
        transfer(fd, 1, buf, REC, i * REC, i);
        sync_device(fd);
        struct line l;
        l.n = 0;
        add(&l, "ACK "), add_u64(&l, i), add(&l, "\n");
        out(&l, 1);
    }
    if (count == 0) die("record limit reached", MAX_RECORD, 0);
}

static void verify(char **argv) {
    u64 first = number(argv[3], MAX_RECORD);
    u64 count = number(argv[4], MAX_RECORD);
    int fd = open_device(argv[2], 0);
    unsigned char *buf = buffer(2 * REC);
    unsigned char *want = buf + REC;
    for (u64 i = first; i < first + count; i++) {
        transfer(fd, 0, buf, REC, i * REC, i);
        record(want, i);
        for (int b = 0; b < REC; b++) {
            if (buf[b] != want[b]) {
                struct line l;
                l.n = 0;
                add(&l, "VERIFY-BAD "), add_u64(&l, i), add(&l, "\n");
                out(&l, 1);
                quit(1);
            }
        }
    }
    struct line l;
    l.n = 0;
    add(&l, "VERIFY-OK "), add_u64(&l, count), add(&l, "\n");
    out(&l, 1);
}

static void dirty(char **argv) {
    u64 size = number(argv[2], MAX_SIZE_MIB) << 20;
    u64 rate_kib = number(argv[3], MAX_SIZE_MIB << 10);
    u64 seconds = number(argv[4], MAX_RECORD);
    u64 pages = size / REC;
    if (pages == 0) usage();
    unsigned char *buf = buffer(size);
    for (u64 p = 0; p < pages; p++) *(volatile u64 *)(buf + p * REC) = p + 1;
    struct line ready;
    ready.n = 0;
    add(&ready, "DIRTY-READY pages="), add_u64(&ready, pages), add(&ready, "\n");
    out(&ready, 1);
    u64 start = now_ns(), last = start, second_start = start;
    u64 written = 0, in_second = 0, max_gap = 0, next = 0, value = 1;
    for (;;) {
        u64 now = now_ns();
        if (now - last > max_gap) max_gap = now - last;
        last = now;
        if (now - second_start >= 1000000000UL) {
            struct line l;
            l.n = 0;
            add(&l, "DIRTY t="), add_u64(&l, (now - start) / 1000000000UL);
            add(&l, " pages="), add_u64(&l, in_second);
            add(&l, " max_gap_us="), add_u64(&l, max_gap / 1000), add(&l, "\n");
            out(&l, 1);
            second_start = now, in_second = 0, max_gap = 0;
            last = now_ns();
            if (seconds && (now - start) / 1000000000UL >= seconds) return;
        }
        /* Pages due by now at the rate; at most 64 per batch, so the clock is read often. */
        u64 due = rate_kib ? (u64)((double)(now - start) / 1e9 * (double)rate_kib / 4.0) : written + 64;
        for (u64 n = 0; written < due && n < 64; n++, written++, in_second++) {
            *(volatile u64 *)(buf + next * REC) = ++value;
            next = next + 1 == pages ? 0 : next + 1;
        }
    }
}

void grove_disktool(i64 argc, char **argv) {
    if (argc < 2) usage();
    if (eq(argv[1], "bench") && (argc == 5 || argc == 6)) bench(argv, (int)argc);
    else if (eq(argv[1], "fsync-loop") && argc == 5) fsync_loop(argv);
    else if (eq(argv[1], "verify") && argc == 5) verify(argv);
    else if (eq(argv[1], "dirty") && argc == 5) dirty(argv);
    else usage();
    quit(0);
}

/* Entry: the kernel starts a process with argc, argv..., 0, envp..., 0 on the stack. */
__asm__(".globl _start\n"
        "_start:\n"
        "  mov (%rsp), %rdi\n"   /* argc */
        "  lea 8(%rsp), %rsi\n"  /* argv */
        "  and $-16, %rsp\n"
        "  call grove_disktool\n"
        "  hlt\n");
