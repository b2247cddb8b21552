/*
 * The Grove test guest: a few hundred bytes of freestanding code that exercises the VMM's
 * devices without Linux. It reads `test=NAME` from the kernel command line (through the zero
 * page, like Linux does), runs that scenario, prints its findings on the serial port, and
 * resets the machine through the i8042 controller (a clean VMM exit).
 *
 * Only plain integer instructions, port I/O and MMIO: it must run under the PVM host's
 * instruction emulator too (see docs/pvm.md).
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define SERIAL 0x3f8
#define VIRTIO_BASE 0xd0000000UL
#define COUNTER_ADDR 0x300000UL
#define VMGENID_ADDR 0xef000UL /* layout::VMGENID_ADDR, also what the DSDT's ADDR returns */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 mmio_read(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static void putc(char c) {
    while (!(inb(SERIAL + 5) & 0x20)) {}
    outb(SERIAL, (u8)c);
}
static void puts(const char *s) { while (*s) putc(*s++); }
static void puthex(u64 v, int digits) {
    for (int i = digits - 1; i >= 0; i--) putc("0123456789abcdef"[(v >> (i * 4)) & 0xf]);
}
static void reset(void) {
    outb(0x64, 0xfe);
    for (;;) __asm__ volatile("hlt");
}
static int starts_with(const char *s, const char *p) {
    while (*p) if (*s++ != *p++) return 0;
    return 1;
}
static const char *find_test(const char *cmdline) {
    for (const char *c = cmdline; *c; c++)
        if ((c == cmdline || c[-1] == ' ') && starts_with(c, "test=")) return c + 5;
    return "";
}
static int is_test(const char *t, const char *name) {
    while (*name)
        if (*t++ != *name++) return 0;
    return *t == 0 || *t == ' ';
}

/* --- virtio-MMIO (modern) driver for one queue --- */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEV_FEATURES 0x010
#define R_DEV_FEATURES_SEL 0x014
#define R_DRV_FEATURES 0x020
#define R_DRV_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INT_STATUS 0x060
#define R_INT_ACK 0x064
#define R_STATUS 0x070
#define R_DESC_LO 0x080
#define R_DESC_HI 0x084
#define R_DRIVER_LO 0x090
#define R_DRIVER_HI 0x094
#define R_DEVICE_LO 0x0a0
#define R_DEVICE_HI 0x0a4
#define R_CONFIG 0x100

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
#define QSIZE 8
#define DESC_TABLE 0x400000UL
#define AVAIL_RING 0x401000UL
#define USED_RING 0x402000UL
#define REQ_HDR 0x403000UL
#define DATA_BUF 0x404000UL
#define STATUS_BYTE 0x405000UL
#define F_NEXT 1
#define F_WRITE 2

static u16 avail_idx;

/* Queue 0's configuration as virtio_init writes it; the hostile cases break one field. */
struct qcfg { u32 size; u64 desc, avail, used; };
static const struct qcfg good_q = {QSIZE, DESC_TABLE, AVAIL_RING, USED_RING};

static int virtio_setup(u64 base, u32 want_low_features, const struct qcfg *q);
static int virtio_init(u64 base, u32 want_low_features) { return virtio_setup(base, want_low_features, &good_q); }

/* Resets the device and negotiates VERSION_1 plus what it offers of `want_low_features`,
 * up to FEATURES_OK. */
static int virtio_negotiate(u64 base, u32 want_low_features) {
    if (mmio_read(base + R_MAGIC) != 0x74726976 || mmio_read(base + R_VERSION) != 2) return -1;
    mmio_write(base + R_STATUS, 0);
    mmio_write(base + R_STATUS, 1);
    mmio_write(base + R_STATUS, 1 | 2);
    mmio_write(base + R_DEV_FEATURES_SEL, 1);
    if (!(mmio_read(base + R_DEV_FEATURES) & 1)) return -2; /* VERSION_1 */
    mmio_write(base + R_DEV_FEATURES_SEL, 0);
    u32 low = mmio_read(base + R_DEV_FEATURES) & want_low_features;
    mmio_write(base + R_DRV_FEATURES_SEL, 1);
    mmio_write(base + R_DRV_FEATURES, 1);
    mmio_write(base + R_DRV_FEATURES_SEL, 0);
    mmio_write(base + R_DRV_FEATURES, low);
    mmio_write(base + R_STATUS, 1 | 2 | 8);
    if (!(mmio_read(base + R_STATUS) & 8)) return -3;
    return 0;
}

static int virtio_setup(u64 base, u32 want_low_features, const struct qcfg *q) {
    int r = virtio_negotiate(base, want_low_features);
    if (r) return r;
    mmio_write(base + R_QUEUE_SEL, 0);
    if (mmio_read(base + R_QUEUE_NUM_MAX) < QSIZE) return -4;
    /* Fresh rings: a device that was reset starts again at index 0. */
    for (u64 a = AVAIL_RING; a < USED_RING + 0x1000; a += 8) *(volatile u64 *)a = 0;
    mmio_write(base + R_QUEUE_NUM, q->size);
    mmio_write(base + R_DESC_LO, (u32)q->desc);
    mmio_write(base + R_DESC_HI, (u32)(q->desc >> 32));
    mmio_write(base + R_DRIVER_LO, (u32)q->avail);
    mmio_write(base + R_DRIVER_HI, (u32)(q->avail >> 32));
    mmio_write(base + R_DEVICE_LO, (u32)q->used);
    mmio_write(base + R_DEVICE_HI, (u32)(q->used >> 32));
    mmio_write(base + R_QUEUE_READY, 1);
    mmio_write(base + R_STATUS, 1 | 2 | 8 | 4);
    avail_idx = 0;
    return 0;
}

/* Posts the chain starting at descriptor 0 and waits for the device to use it.
 * Returns the used length, or -1 on timeout. */
static long virtio_submit(u64 base) {
    volatile u16 *avail = (volatile u16 *)AVAIL_RING; /* flags, idx, ring[] */
    volatile u16 *used_idx = (volatile u16 *)(USED_RING + 2);
    volatile u32 *used_ring = (volatile u32 *)(USED_RING + 4); /* {id, len} pairs */
    u16 before = *used_idx;
    avail[2 + (avail_idx % QSIZE)] = 0;
    barrier();
    avail_idx++;
    avail[1] = avail_idx;
    barrier();
    mmio_write(base + R_QUEUE_NOTIFY, 0);
    for (u64 spin = 0; *used_idx == before; spin++)
        if (spin > 2000000000ULL) return -1;
    barrier();
    u32 len = used_ring[((u16)(*used_idx - 1) % QSIZE) * 2 + 1];
    mmio_write(base + R_INT_ACK, mmio_read(base + R_INT_STATUS));
    return len;
}

static long blk_request(u64 base, u32 type, u64 sector, u32 data_len, int device_writes) {
    volatile struct desc *d = (volatile struct desc *)DESC_TABLE;
    volatile u32 *hdr = (volatile u32 *)REQ_HDR;
    hdr[0] = type;
    hdr[1] = 0;
    *(volatile u64 *)(REQ_HDR + 8) = sector;
    *(volatile u8 *)STATUS_BYTE = 0xee;
    d[0].addr = REQ_HDR; d[0].len = 16; d[0].flags = F_NEXT; d[0].next = 1;
    int s = 1;
    if (data_len) {
        d[1].addr = DATA_BUF; d[1].len = data_len; d[1].flags = F_NEXT | (device_writes ? F_WRITE : 0); d[1].next = 2;
        s = 2;
    } else {
        d[0].next = 2;
    }
    d[s].addr = STATUS_BYTE; d[s].len = 1; d[s].flags = F_WRITE; d[s].next = 0;
    long used = virtio_submit(base);
    puts(" status="); puthex(*(volatile u8 *)STATUS_BYTE, 2);
    puts(" used="); puthex((u64)used, 4);
    return used;
}

static void test_blk(void) {
    u64 base = VIRTIO_BASE;
    int r = virtio_init(base, 1u << 9 /* FLUSH */);
    puts("blk-init="); puthex((u64)(r & 0xff), 2);
    puts(" capacity="); puthex(mmio_read(base + R_CONFIG), 8);
    puts("\n");
    if (r) return;
    volatile u8 *buf = (volatile u8 *)DATA_BUF;
    /* Read sector 1: the host wrote 0x5a there. */
    puts("read1"); blk_request(base, 0, 1, 512, 1);
    puts(" byte0="); puthex(buf[0], 2); puts(" byte511="); puthex(buf[511], 2); puts("\n");
    /* Write sector 2 with 0xc3 and flush. */
    for (int i = 0; i < 512; i++) buf[i] = 0xc3;
    puts("write2"); blk_request(base, 1, 2, 512, 0); puts("\n");
    puts("flush"); blk_request(base, 4, 0, 0, 0); puts("\n");
    /* Read it back through the device. */
    for (int i = 0; i < 512; i++) buf[i] = 0;
    puts("read2"); blk_request(base, 0, 2, 512, 1);
    puts(" byte0="); puthex(buf[0], 2); puts("\n");
    /* Past the end of the disk: must be an I/O error, not a crash. */
    puts("beyond"); blk_request(base, 0, 0x100000, 512, 1); puts("\n");
    /* Serial number. */
    for (int i = 0; i < 20; i++) buf[i] = 0;
    puts("getid"); blk_request(base, 8, 0, 20, 1);
    puts(" id=");
    for (int i = 0; i < 20 && buf[i]; i++) putc((char)buf[i]);
    puts("\n");
}

static void test_rng(void) {
    u64 base = VIRTIO_BASE;
    int r = virtio_init(base, 0);
    puts("rng-init="); puthex((u64)(r & 0xff), 2); puts("\n");
    if (r) return;
    volatile struct desc *d = (volatile struct desc *)DESC_TABLE;
    volatile u64 *buf = (volatile u64 *)DATA_BUF;
    buf[0] = 0; buf[1] = 0;
    d[0].addr = DATA_BUF; d[0].len = 16; d[0].flags = F_WRITE; d[0].next = 0;
    long used = virtio_submit(base);
    puts("rng used="); puthex((u64)used, 4);
    puts(" nonzero="); puthex((buf[0] | buf[1]) != 0, 1); puts("\n");
}

static void test_pio_mmio(void) {
    puts("unclaimed-pio="); puthex(inb(0x80), 2);
    puts(" unclaimed-mmio="); puthex(mmio_read(0xe0000000UL), 8);
    puts(" virtio-magic="); puthex(mmio_read(VIRTIO_BASE + R_MAGIC), 8);
    puts(" virtio-device="); puthex(mmio_read(VIRTIO_BASE + R_DEVICE_ID), 8);
    puts("\n");
}

static void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d) {
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static void test_cpuid(void) {
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    puts("leaf1 ebx="); puthex(b, 8); puts(" ecx="); puthex(c, 8); puts(" edx="); puthex(d, 8);
    cpuid(7, 0, &a, &b, &c, &d);
    puts(" leaf7 ebx="); puthex(b, 8); puts(" edx="); puthex(d, 8);
    cpuid(0x40000000, 0, &a, &b, &c, &d);
    puts(" hv=");
    u32 sig[3] = {b, c, d};
    for (int i = 0; i < 12; i++) putc((char)(sig[i / 4] >> ((i % 4) * 8)));
    puts("\n");
}

static void test_counter(void) {
    volatile u64 *counter = (volatile u64 *)COUNTER_ADDR;
    puts("counting\n");
    for (;;) (*counter)++;
}

/* Dirties memory as fast as it can: one word in every page of DIRTY_START..DIRTY_END per
 * sweep, each sweep writing the next counter value (a live snapshot's worst case). */
#define DIRTY_START 0x1000000UL
#define DIRTY_END 0x3000000UL
static void test_dirty(void) {
    volatile u64 *counter = (volatile u64 *)COUNTER_ADDR;
    puts("dirtying\n");
    for (;;) {
        u64 v = ++*counter;
        for (u64 a = DIRTY_START; a < DIRTY_END; a += 4096) *(volatile u64 *)a = v;
    }
}

/* Prints the VM generation ID, then counts and prints it again whenever it changes (the VMM
 * writes a new one when a restored VM first resumes). */
static void print_vmgenid(u64 lo, u64 hi) {
    puts("vmgenid=");
    for (int i = 0; i < 16; i++) puthex(((i < 8 ? lo : hi) >> ((i % 8) * 8)) & 0xff, 2);
    puts("\n");
}
static void test_vmgenid(void) {
    volatile u64 *id = (volatile u64 *)VMGENID_ADDR;
    volatile u64 *counter = (volatile u64 *)COUNTER_ADDR;
    u64 lo = id[0], hi = id[1];
    print_vmgenid(lo, hi);
    for (;;) {
        (*counter)++;
        if (id[0] != lo || id[1] != hi) {
            lo = id[0];
            hi = id[1];
            print_vmgenid(lo, hi);
        }
    }
}

/* --- test=hostile: a driver that breaks every rule, one case at a time ---
 * Each case prints "hostile NAME status=SS used=UUUU nr=N canary=C": the status byte the
 * device wrote (ee: untouched), the used length (none: the device stopped instead of using
 * the chain), whether Status shows DEVICE_NEEDS_RESET, and whether the canary bytes around
 * every buffer the case aimed at (inside RAM) are unchanged. Then "recover NAME reset=R ok=1":
 * after a device reset (when R=1) a normal request succeeds. See docs/hostile-guests.md. */
#define S_NEEDS_RESET 0x40
#define CANARY 0xa5
#define NOTHING_BASE 0xe0000000UL
#define F_INDIRECT 4
static const u8 *zero_page_ptr;
static u64 ram_end, blk_base, rng_base;

static u64 find_ram_end(void) {
    u8 n = zero_page_ptr[0x1e8];
    u64 end = 0;
    for (int i = 0; i < n && i < 128; i++) {
        const u8 *e = zero_page_ptr + 0x2d0 + i * 20;
        u64 a = *(const u64 *)e, sz = *(const u64 *)(e + 8);
        if (*(const u32 *)(e + 16) == 1 && a + sz > end) end = a + sz;
    }
    return end;
}
static u64 find_device(u32 type) {
    for (u64 i = 0; i < 8; i++) {
        u64 b = VIRTIO_BASE + i * 0x1000;
        if (mmio_read(b + R_MAGIC) == 0x74726976 && mmio_read(b + R_DEVICE_ID) == type) return b;
    }
    return 0;
}
static void fill(u64 a, u64 n, u8 v) { for (u64 i = 0; i < n; i++) *(volatile u8 *)(a + i) = v; }
static int same(u64 a, u64 n, u8 v) {
    for (u64 i = 0; i < n; i++) if (*(volatile u8 *)(a + i) != v) return 0;
    return 1;
}
/* Around (and in) every buffer a case aims at: the data buffer, the bytes after the status
 * byte, the last 512 bytes of RAM (a straddling buffer's in-RAM half). */
static void arm_canaries(void) {
    fill(DATA_BUF - 64, 512 + 128, CANARY);
    fill(STATUS_BYTE + 1, 63, CANARY);
    fill(ram_end - 512, 512, CANARY);
}
static int canaries_ok(void) {
    return same(DATA_BUF - 64, 512 + 128, CANARY) && same(STATUS_BYTE + 1, 63, CANARY) &&
           same(ram_end - 512, 512, CANARY);
}
static int needs_reset(u64 base) { return (mmio_read(base + R_STATUS) & S_NEEDS_RESET) != 0; }
static void setd(int i, u64 addr, u32 len, u16 flags, u16 next) {
    volatile struct desc *d = (volatile struct desc *)DESC_TABLE;
    d[i].addr = addr; d[i].len = len; d[i].flags = flags; d[i].next = next;
}
/* Publishes `head`, moving the available index by `step` (1 for an honest driver), notifies
 * `queue` and waits: the used length, -2 when the device asked for a reset instead, -1 when
 * nothing happened. */
static long post(u64 base, u16 head, u16 step, u32 queue) {
    volatile u16 *avail = (volatile u16 *)AVAIL_RING;
    volatile u16 *used_idx = (volatile u16 *)(USED_RING + 2);
    volatile u32 *used_ring = (volatile u32 *)(USED_RING + 4);
    u16 before = *used_idx;
    avail[2 + (avail_idx % QSIZE)] = head;
    barrier();
    avail_idx += step;
    avail[1] = avail_idx;
    barrier();
    mmio_write(base + R_QUEUE_NOTIFY, queue);
    for (u64 spin = 0; *used_idx == before; spin++) {
        if ((spin & 255) == 0 && needs_reset(base)) return -2;
        if (spin > 5000000ULL) return -1; /* seconds under the PVM emulator */
    }
    barrier();
    u32 len = used_ring[((u16)(*used_idx - 1) % QSIZE) * 2 + 1];
    mmio_write(base + R_INT_ACK, mmio_read(base + R_INT_STATUS));
    return len;
}
static void blk_hdr(u32 type, u64 sector) {
    volatile u32 *hdr = (volatile u32 *)REQ_HDR;
    hdr[0] = type; hdr[1] = 0;
    *(volatile u64 *)(REQ_HDR + 8) = sector;
}
/* The well-formed three-descriptor request the cases start from: header, data, status. */
static void blk_chain(u32 type, u64 sector, u16 data_flags) {
    blk_hdr(type, sector);
    setd(0, REQ_HDR, 16, F_NEXT, 1);
    setd(1, DATA_BUF, 512, F_NEXT | data_flags, 2);
    setd(2, STATUS_BYTE, 1, F_WRITE, 0);
}
static void report(u64 base, const char *name, long used, int has_status) {
    puts("hostile "); puts(name);
    if (has_status) { puts(" status="); puthex(*(volatile u8 *)STATUS_BYTE, 2); }
    puts(" used=");
    if (used >= 0) puthex((u64)used, 4);
    else puts(used == -2 ? "none" : "timeout");
    puts(" nr="); puthex(needs_reset(base), 1);
    puts(" canary="); puts(canaries_ok() ? "ok" : "BAD");
    puts("\n");
}
/* Proves the block device works: reset first if it asked for it, then read sector 1 (the
 * host filled it with 0x5a). */
static void blk_recover(const char *name) {
    int was = needs_reset(blk_base);
    int r = was ? virtio_init(blk_base, 1u << 9) : 0;
    fill(DATA_BUF, 512, 0);
    blk_chain(0, 1, F_WRITE);
    *(volatile u8 *)STATUS_BYTE = 0xee;
    long used = post(blk_base, 0, 1, 0);
    volatile u8 *buf = (volatile u8 *)DATA_BUF;
    int ok = r == 0 && used == 0x201 && *(volatile u8 *)STATUS_BYTE == 0 && buf[0] == 0x5a && buf[511] == 0x5a;
    puts("recover "); puts(name); puts(" reset="); puthex(was, 1); puts(" ok="); puthex(ok, 1); puts("\n");
}
static void blk_case_end(const char *name, long used) {
    report(blk_base, name, used, 1);
    blk_recover(name);
}
static void no_request_case(const char *name) {
    puts("hostile "); puts(name);
    puts(" nr="); puthex(needs_reset(blk_base), 1);
    puts(" canary="); puts(canaries_ok() ? "ok" : "BAD"); puts("\n");
    blk_recover(name);
}
static void blk_begin(void) {
    arm_canaries();
    *(volatile u8 *)STATUS_BYTE = 0xee;
}

static void hostile_chains(void) {
    /* A loop: data -> header -> data ... */
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(1, DATA_BUF, 512, F_NEXT | F_WRITE, 0);
    blk_case_end("loop", post(blk_base, 0, 1, 0));
    /* Every descriptor of the table, the last pointing back at the first: longer than the queue. */
    blk_begin(); blk_hdr(0, 1);
    for (int i = 0; i < QSIZE; i++) setd(i, REQ_HDR, 16, F_NEXT, (u16)((i + 1) % QSIZE));
    blk_case_end("longer-than-queue", post(blk_base, 0, 1, 0));
    /* next >= queue size. */
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(1, DATA_BUF, 512, F_NEXT | F_WRITE, 200);
    blk_case_end("next-out-of-range", post(blk_base, 0, 1, 0));
    /* A head index >= queue size in the available ring. */
    blk_begin(); blk_chain(0, 1, F_WRITE);
    blk_case_end("head-out-of-range", post(blk_base, 77, 1, 0));
    /* Two 4 GiB - 1 buffers: a chain longer than 2^32 bytes. */
    blk_begin(); blk_chain(0, 1, F_WRITE);
    setd(1, DATA_BUF, 0xffffffffu, F_NEXT | F_WRITE, 3); setd(3, DATA_BUF, 0xffffffffu, F_NEXT | F_WRITE, 2);
    blk_case_end("chain-over-4g", post(blk_base, 0, 1, 0));
    /* An indirect table outside RAM (indirect descriptors are not offered). */
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(1, 0x100000000ULL, 64, F_INDIRECT, 0);
    blk_case_end("indirect-outside-ram", post(blk_base, 0, 1, 0));
}

static void hostile_buffers(void) {
    /* Data buffer outside RAM, straddling its end, wrapping 2^64. */
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(1, 0x100000000ULL, 512, F_NEXT | F_WRITE, 2);
    blk_case_end("data-outside-ram", post(blk_base, 0, 1, 0));
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(1, ram_end - 256, 512, F_NEXT | F_WRITE, 2);
    blk_case_end("data-straddles-ram-end", post(blk_base, 0, 1, 0));
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(1, 0xffffffffffffff00ULL, 512, F_NEXT | F_WRITE, 2);
    blk_case_end("data-wraps", post(blk_base, 0, 1, 0));
    /* Header and status outside RAM. */
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(0, 0xfffffffffffffff8ULL, 16, F_NEXT, 1);
    blk_case_end("header-wraps", post(blk_base, 0, 1, 0));
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(2, ram_end, 1, F_WRITE, 0);
    blk_case_end("status-outside-ram", post(blk_base, 0, 1, 0));
    /* Zero and huge lengths. */
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(1, DATA_BUF, 0, F_NEXT | F_WRITE, 2);
    blk_case_end("zero-length-data", post(blk_base, 0, 1, 0));
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(0, REQ_HDR, 0, F_NEXT, 1);
    blk_case_end("zero-length-header", post(blk_base, 0, 1, 0));
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(2, STATUS_BYTE, 0, F_WRITE, 0);
    blk_case_end("zero-length-status", post(blk_base, 0, 1, 0));
    /* As long as a chain may be (16 + this + 1 < 4 GiB): far beyond RAM. */
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(1, DATA_BUF, 0xffffffe0u, F_NEXT | F_WRITE, 2);
    blk_case_end("huge-length-data", post(blk_base, 0, 1, 0));
    /* 4 GiB - 1: the chain as a whole exceeds 2^32 bytes, which no driver may post. */
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(1, DATA_BUF, 0xffffffffu, F_NEXT | F_WRITE, 2);
    blk_case_end("max-length-data", post(blk_base, 0, 1, 0));
    /* Wrong directions: a header the device may only write, data the device may only read
     * in a read (and only write in a write), a status byte it may only read. */
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(0, REQ_HDR, 16, F_NEXT | F_WRITE, 1);
    blk_case_end("header-device-writable", post(blk_base, 0, 1, 0));
    blk_begin(); blk_chain(0, 1, 0);
    blk_case_end("read-into-readonly-data", post(blk_base, 0, 1, 0));
    blk_begin(); blk_chain(1, 3, F_WRITE);
    blk_case_end("write-from-writable-data", post(blk_base, 0, 1, 0));
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(2, STATUS_BYTE, 1, 0, 0);
    blk_case_end("status-readonly", post(blk_base, 0, 1, 0));
}

static void hostile_requests(void) {
    blk_begin(); blk_chain(0, 0x100000, F_WRITE);
    blk_case_end("sector-past-end", post(blk_base, 0, 1, 0));
    blk_begin(); blk_chain(0, 0xffffffffffffffffULL, F_WRITE);
    blk_case_end("sector-overflows", post(blk_base, 0, 1, 0));
    blk_begin(); blk_chain(1, 0x7fffffffffffffffULL, 0);
    blk_case_end("write-sector-overflows", post(blk_base, 0, 1, 0));
    blk_begin(); blk_chain(0x77, 1, F_WRITE);
    blk_case_end("unknown-type", post(blk_base, 0, 1, 0));
    blk_begin(); blk_chain(0, 1, F_WRITE); setd(1, DATA_BUF, 100, F_NEXT | F_WRITE, 2);
    blk_case_end("partial-sector", post(blk_base, 0, 1, 0));
}

/* Queue configurations the transport must refuse at DRIVER_OK. */
static void queue_case(const char *name, struct qcfg q) {
    arm_canaries();
    int r = virtio_setup(blk_base, 1u << 9, &q);
    puts("hostile "); puts(name); puts(" init="); puthex((u64)(r & 0xff), 2);
    puts(" nr="); puthex(needs_reset(blk_base), 1);
    puts(" canary="); puts(canaries_ok() ? "ok" : "BAD"); puts("\n");
    blk_recover(name);
}
static void hostile_queues(void) {
    struct qcfg q;
    q = good_q; q.size = 0; queue_case("queue-size-0", q);
    q = good_q; q.size = 3; queue_case("queue-size-3", q);
    q = good_q; q.size = mmio_read(blk_base + R_QUEUE_NUM_MAX) * 2; queue_case("queue-size-above-max", q);
    q = good_q; q.desc = 0x100000000ULL; queue_case("desc-outside-ram", q);
    q = good_q; q.avail = ram_end - 2; queue_case("avail-straddles-ram-end", q);
    q = good_q; q.used = 0xfffffffffffff000ULL; queue_case("used-wraps", q);
    q = good_q; q.desc = DESC_TABLE + 8; queue_case("desc-misaligned", q);
    q = good_q; q.used = USED_RING + 2; queue_case("used-misaligned", q);

    /* Notifications for queues that do not exist, at every width. */
    blk_begin();
    mmio_write(blk_base + R_QUEUE_NOTIFY, 5);
    mmio_write(blk_base + R_QUEUE_NOTIFY, 0xffffffffu);
    *(volatile u16 *)(blk_base + R_QUEUE_NOTIFY) = 0;
    *(volatile u8 *)(blk_base + R_QUEUE_NOTIFY) = 0;
    no_request_case("notify-unknown-queue");
    /* The available index jumps 100 entries ahead of an 8-entry ring. */
    blk_begin(); blk_chain(0, 1, F_WRITE);
    blk_case_end("avail-index-jump", post(blk_base, 0, 100, 0));
    /* Queue registers written while the device runs (they are frozen). */
    blk_begin();
    mmio_write(blk_base + R_QUEUE_NUM, 3);
    mmio_write(blk_base + R_DESC_HI, 0xffff);
    mmio_write(blk_base + R_QUEUE_READY, 0);
    no_request_case("queue-regs-while-running");
}

/* MMIO and port I/O nobody should send. */
static void hostile_mmio(void) {
    u64 b = blk_base;
    u64 acc = 0;
    /* Unknown register offsets and wrong widths: read as zero, writes dropped. */
    u64 unknown[] = {0x018, 0x03c, 0x0a8, 0x0c0, 0x0f8, 0x0fe};
    for (int i = 0; i < 6; i++) {
        u64 a = b + unknown[i];
        acc |= *(volatile u8 *)a;
        if (!(a & 1)) acc |= *(volatile u16 *)a;
        if (!(a & 3)) acc |= *(volatile u32 *)a;
        if (!(a & 7)) acc |= *(volatile u64 *)a;
        *(volatile u8 *)a = 0xff;
        if (!(a & 1)) *(volatile u16 *)a = 0xffff;
        if (!(a & 3)) *(volatile u32 *)a = 0xffffffffu;
        if (!(a & 7)) *(volatile u64 *)a = ~0ULL;
    }
    /* Registers at the wrong width: 1, 2 and 8 bytes are ignored. */
    acc |= *(volatile u8 *)(b + R_MAGIC);
    acc |= *(volatile u16 *)(b + R_MAGIC);
    acc |= *(volatile u64 *)(b + R_MAGIC);
    *(volatile u8 *)(b + R_STATUS) = 0;
    *(volatile u64 *)(b + R_STATUS) = 0;
    /* Config space beyond the block config, at every width, to the end of the window. */
    u64 c = b + R_CONFIG + 0x800;
    acc |= *(volatile u8 *)c | *(volatile u16 *)c | *(volatile u32 *)c | *(volatile u64 *)c;
    acc |= *(volatile u64 *)(b + 0xff8);
    *(volatile u8 *)c = 1; *(volatile u16 *)c = 1; *(volatile u32 *)c = 1; *(volatile u64 *)c = 1;
    /* Read-only registers and config written. */
    u32 cap = mmio_read(b + R_CONFIG);
    mmio_write(b + R_MAGIC, 0); mmio_write(b + R_VERSION, 1); mmio_write(b + R_DEVICE_ID, 9);
    mmio_write(b + R_QUEUE_NUM_MAX, 1); mmio_write(b + R_INT_STATUS, 3);
    mmio_write(b + R_CONFIG, 0xffffffffu); *(volatile u64 *)(b + R_CONFIG) = ~0ULL;
    int ro_ok = mmio_read(b + R_MAGIC) == 0x74726976 && mmio_read(b + R_VERSION) == 2 &&
                mmio_read(b + R_DEVICE_ID) == 2 && mmio_read(b + R_QUEUE_NUM_MAX) >= QSIZE &&
                mmio_read(b + R_CONFIG) == cap;
    blk_begin();
    puts("hostile mmio-unknown unknown-reads="); puthex(acc, 16);
    puts(" read-only-kept="); puthex(ro_ok, 1);
    puts(" nr="); puthex(needs_reset(b), 1); puts("\n");
    blk_recover("mmio-unknown");

    /* Where no device lives: an empty virtio window and a hole. */
    u64 none[] = {VIRTIO_BASE + 7 * 0x1000, NOTHING_BASE, NOTHING_BASE + 0x123};
    u64 ones = ~0ULL;
    for (int i = 0; i < 3; i++) {
        u64 a = none[i];
        ones &= *(volatile u8 *)a | 0xffffffffffffff00ULL;
        if (!(a & 1)) ones &= *(volatile u16 *)a | 0xffffffffffff0000ULL;
        if (!(a & 3)) ones &= *(volatile u32 *)a | 0xffffffff00000000ULL;
        if (!(a & 7)) ones &= *(volatile u64 *)a;
        *(volatile u8 *)a = 0;
        if (!(a & 7)) *(volatile u64 *)a = 0;
    }
    puts("hostile mmio-nowhere all-ones="); puthex(ones == ~0ULL, 1); puts("\n");

    /* Port I/O to ports nobody claims, at every width. */
    u32 pones = 0xffffffffu;
    u16 ports[] = {0x80, 0x1234, 0xfff0};
    for (int i = 0; i < 3; i++) {
        u16 p = ports[i];
        u8 v8; u16 v16; u32 v32;
        __asm__ volatile("inb %1, %0" : "=a"(v8) : "Nd"(p));
        __asm__ volatile("inw %1, %0" : "=a"(v16) : "Nd"(p));
        __asm__ volatile("inl %1, %0" : "=a"(v32) : "Nd"(p));
        pones &= (0xffffff00u | v8) & (0xffff0000u | v16) & v32;
        __asm__ volatile("outb %0, %1" : : "a"((u8)0x5a), "Nd"(p));
        __asm__ volatile("outw %0, %1" : : "a"((u16)0x5a5a), "Nd"(p));
        __asm__ volatile("outl %0, %1" : : "a"(0x5a5a5a5au), "Nd"(p));
    }
    puts("hostile pio-nowhere all-ones="); puthex(pones == 0xffffffffu, 1); puts("\n");
    blk_recover("io-nowhere");
}

/* virtio-rng: the same ring-level and buffer cases. */
static void rng_case(const char *name, u16 step) {
    long used = post(rng_base, 0, step, 0);
    report(rng_base, name, used, 0);
    int was = needs_reset(rng_base);
    int r = was ? virtio_init(rng_base, 0) : 0;
    fill(DATA_BUF, 16, 0);
    setd(0, DATA_BUF, 16, F_WRITE, 0);
    used = post(rng_base, 0, 1, 0);
    volatile u64 *buf = (volatile u64 *)DATA_BUF;
    int ok = r == 0 && used == 16 && (buf[0] | buf[1]) != 0;
    puts("recover "); puts(name); puts(" reset="); puthex(was, 1); puts(" ok="); puthex(ok, 1); puts("\n");
}
static void hostile_rng(void) {
    int r = virtio_init(rng_base, 0);
    puts("rng-init="); puthex((u64)(r & 0xff), 2); puts("\n");
    if (r) return;
    arm_canaries(); setd(0, DATA_BUF, 16, F_NEXT | F_WRITE, 0);
    rng_case("rng-loop", 1);
    arm_canaries(); setd(0, DATA_BUF, 16, F_NEXT | F_WRITE, 9);
    rng_case("rng-next-out-of-range", 1);
    arm_canaries(); setd(0, 0x100000000ULL, 16, F_WRITE, 0);
    rng_case("rng-outside-ram", 1);
    arm_canaries(); setd(0, ram_end - 8, 16, F_WRITE, 0);
    rng_case("rng-straddles-ram-end", 1);
    arm_canaries(); setd(0, 0xfffffffffffffff8ULL, 16, F_WRITE, 0);
    rng_case("rng-wraps", 1);
    arm_canaries(); setd(0, DATA_BUF, 0xffffffffu, F_WRITE, 0);
    rng_case("rng-huge-length", 1);
    arm_canaries(); setd(0, DATA_BUF, 0, F_WRITE, 0);
    rng_case("rng-zero-length", 1);
    arm_canaries(); setd(0, DATA_BUF, 16, 0, 0);
    rng_case("rng-readonly-buffer", 1);
    arm_canaries(); setd(0, DATA_BUF, 16, F_WRITE, 0);
    rng_case("rng-avail-index-jump", 100);
}

static void test_hostile(void) {
    ram_end = find_ram_end();
    blk_base = find_device(2);
    rng_base = find_device(4);
    puts("hostile-start ram-end="); puthex(ram_end, 8);
    puts(" blk="); puthex(blk_base, 8); puts(" rng="); puthex(rng_base, 8); puts("\n");
    if (!blk_base || !rng_base || ram_end < 0x1000000) return;
    int r = virtio_init(blk_base, 1u << 9);
    puts("blk-init="); puthex((u64)(r & 0xff), 2); puts("\n");
    if (r) return;
    hostile_chains();
    hostile_buffers();
    hostile_requests();
    hostile_queues();
    hostile_mmio();
    hostile_rng();
    /* The same misbehaviour many times over: the VMM's log must stay bounded. */
    int stopped = 0;
    for (int i = 0; i < 50; i++) {
        blk_chain(0, 1, F_WRITE); setd(1, DATA_BUF, 512, F_NEXT | F_WRITE, 0);
        stopped += post(blk_base, 0, 1, 0) == -2;
        virtio_init(blk_base, 1u << 9);
    }
    puts("hostile repeat-50 stopped="); puthex((u64)stopped, 2); puts("\n");
    blk_recover("repeat-50");
    puts("hostile-done\n");
    /* Wait for one byte of console input: the host checks the VMM meanwhile. */
    while (!(inb(SERIAL + 5) & 1)) {}
    puts("hostile-exit\n");
}

/* --- test=hostile-io: the same for the devices with several queues, virtio-net and
 * virtio-vsock. Queue q's rings are at MQ_RING(q) (descriptors, then the available and the
 * used ring a page apart); transmit buffers at IO_TX, the receive buffer at IO_RX, with
 * canaries around it. Each case prints "hostile NAME used=UUUU nr=N ... canary=C" and then
 * "recover NAME reset=R ok=1": a well-formed exchange works, after a reset when R=1.
 * The host side (vmm/tests/kvm_hostile.rs) echoes frames with ethertype 0x88b5 back into the
 * TAP and echoes bytes on vsock port 5000; nobody listens on vsock port 9. */
#define MQ_RING(q) (0x500000UL + (u64)(q) * 0x4000UL)
#define IO_TX 0x520000UL /* up to 0x20000 bytes: the too-long frame */
#define IO_RX 0x540000UL /* 0x1000 bytes, canaries 64 bytes either side */
#define IO_RX_LOOP 0x548000UL /* where the looping receive chain points (outside the canaries) */
#define RX_LEN 0x1000
static u16 mq_avail[3], mq_seen[3];
static u64 net_base, vs_base, vs_cid;

static int mq_setup(u64 base, int nq) {
    int r = virtio_negotiate(base, 0);
    if (r) return r;
    for (int q = 0; q < nq; q++) {
        u64 ring = MQ_RING(q);
        for (u64 a = ring + 0x1000; a < ring + 0x3000; a += 8) *(volatile u64 *)a = 0;
        mmio_write(base + R_QUEUE_SEL, (u32)q);
        if (mmio_read(base + R_QUEUE_NUM_MAX) < QSIZE) return -4;
        mmio_write(base + R_QUEUE_NUM, QSIZE);
        mmio_write(base + R_DESC_LO, (u32)ring);
        mmio_write(base + R_DESC_HI, 0);
        mmio_write(base + R_DRIVER_LO, (u32)(ring + 0x1000));
        mmio_write(base + R_DRIVER_HI, 0);
        mmio_write(base + R_DEVICE_LO, (u32)(ring + 0x2000));
        mmio_write(base + R_DEVICE_HI, 0);
        mmio_write(base + R_QUEUE_READY, 1);
        mq_avail[q] = 0;
        mq_seen[q] = 0;
    }
    mmio_write(base + R_STATUS, 1 | 2 | 8 | 4);
    return 0;
}
static void mq_setd(int q, int i, u64 addr, u32 len, u16 flags, u16 next) {
    volatile struct desc *d = (volatile struct desc *)MQ_RING(q);
    d[i].addr = addr; d[i].len = len; d[i].flags = flags; d[i].next = next;
}
/* Publishes `head` on queue q, moving the available index by `step`, and notifies. */
static void mq_give(u64 base, int q, u16 head, u16 step) {
    volatile u16 *avail = (volatile u16 *)(MQ_RING(q) + 0x1000);
    avail[2 + (mq_avail[q] % QSIZE)] = head;
    barrier();
    mq_avail[q] += step;
    avail[1] = mq_avail[q];
    barrier();
    mmio_write(base + R_QUEUE_NOTIFY, (u32)q);
}
/* The next used entry of queue q: its length, -2 when the device asked for a reset instead,
 * -1 when nothing came. */
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
/* A timeout in TSC ticks: 5 to 20 seconds at the clock rates of x86 hosts. These waits
 * involve the host's echo threads, so they are bounded in time, not in spins (which take
 * seconds under the PVM emulator but milliseconds on bare metal). */
#define IO_TIMEOUT_TICKS 20000000000ULL
static long mq_wait(u64 base, int q) {
    volatile u16 *used_idx = (volatile u16 *)(MQ_RING(q) + 0x2002);
    volatile u32 *used_ring = (volatile u32 *)(MQ_RING(q) + 0x2004);
    u64 start = rdtsc();
    for (u64 spin = 0; *used_idx == mq_seen[q]; spin++) {
        if ((spin & 255) == 0 && needs_reset(base)) return -2;
        if ((spin & 255) == 0 && rdtsc() - start > IO_TIMEOUT_TICKS) return -1;
    }
    barrier();
    u32 len = used_ring[(mq_seen[q] % QSIZE) * 2 + 1];
    mq_seen[q]++;
    mmio_write(base + R_INT_ACK, mmio_read(base + R_INT_STATUS));
    return len;
}
/* Posts the good receive buffer (queue 0, descriptor 0) and waits for it. */
static long mq_recv(u64 base) {
    mq_setd(0, 0, IO_RX, RX_LEN, F_WRITE, 0);
    mq_give(base, 0, 0, 1);
    return mq_wait(base, 0);
}
static void io_arm(void) {
    fill(IO_RX - 64, RX_LEN + 128, CANARY);
    fill(ram_end - 512, 512, CANARY);
}
static int io_canaries_ok(void) { return same(IO_RX - 64, RX_LEN + 128, CANARY) && same(ram_end - 512, 512, CANARY); }
static void io_report(u64 base, const char *name, long used) {
    puts("hostile "); puts(name); puts(" used=");
    if (used >= 0) puthex((u64)used, 4);
    else puts(used == -2 ? "none" : "timeout");
    puts(" nr="); puthex(needs_reset(base), 1);
}
static void io_report_end(int canary_ok) {
    puts(" canary="); puts(canary_ok ? "ok" : "BAD"); puts("\n");
}
static void io_recover_line(const char *name, int was, int ok) {
    puts("recover "); puts(name); puts(" reset="); puthex(was, 1); puts(" ok="); puthex(ok, 1); puts("\n");
}

/* virtio-net: frames of ethertype 0x88b5 whose payload bytes all carry a marker. Case k
 * sends marker k, its recovery 0x80 | k; the host echoes each frame it gets. */
#define NET_FRAME 72 /* vnet header 12 + Ethernet header 14 + 46 bytes of payload */
static void net_frame(u64 at, u8 marker, u32 len) {
    fill(at, 12, 0);
    fill(at + 12, 6, 0xff);
    u8 src[6] = {2, 0, 0, 0, 0, 1};
    for (int i = 0; i < 6; i++) *(volatile u8 *)(at + 18 + i) = src[i];
    *(volatile u8 *)(at + 24) = 0x88; *(volatile u8 *)(at + 25) = 0xb5;
    fill(at + 26, len - 26, marker);
}
/* Receives until the echo of `want`; sets *echoed when the echo of `also` came first.
 * Frames that are not ours (the host's own traffic) are skipped. */
static int net_recv_echo(u8 want, u8 also, int *echoed) {
    for (int i = 0; i < 32; i++) {
        fill(IO_RX, NET_FRAME, 0);
        long used = mq_recv(net_base);
        if (used < 0) return 0;
        volatile u8 *f = (volatile u8 *)IO_RX;
        if (used < NET_FRAME || f[24] != 0x88 || f[25] != 0xb5) continue;
        if (f[26] == want) return 1;
        if (f[26] == also) *echoed = 1;
    }
    return 0;
}
/* Resets the device if it asked for it (*was), sends a good frame (marker 0x80 | k) and
 * waits for its echo; the echo of the hostile frame k, if any, arrives first (*echoed). */
static int net_probe(u8 k, int *was, int *echoed) {
    *was = needs_reset(net_base);
    int r = *was ? mq_setup(net_base, 2) : 0;
    net_frame(IO_TX, 0x80 | k, NET_FRAME);
    mq_setd(1, 0, IO_TX, NET_FRAME, 0, 0);
    mq_give(net_base, 1, 0, 1);
    return r == 0 && mq_wait(net_base, 1) == 0 && net_recv_echo(0x80 | k, k, echoed);
}
static void net_recover(const char *name, u8 k, int *echoed) {
    int was;
    int ok = net_probe(k, &was, echoed);
    io_recover_line(name, was, ok);
}
/* A transmit case: descriptors 0.. of queue 1 hold the hostile chain; `step` moves the
 * available index. Prints whether the frame reached the host (its echo came back). */
static void net_tx_case(const char *name, u8 k, u16 step) {
    long used;
    mq_give(net_base, 1, 0, step);
    used = mq_wait(net_base, 1);
    int canary = io_canaries_ok();
    int echoed = 0, was;
    io_report(net_base, name, used);
    /* Recover first: the echo of the hostile frame, if any, arrives before the good one's. */
    int ok = net_probe(k, &was, &echoed);
    puts(" echo="); puthex(echoed, 1);
    io_report_end(canary);
    io_recover_line(name, was, ok);
}
/* A receive case: descriptors 0.. of queue 0 hold the hostile buffer; a good frame (marker
 * k) is sent so that its echo meets that buffer. */
static void net_rx_case(const char *name, u8 k) {
    mq_give(net_base, 0, 0, 1);
    net_frame(IO_TX, k, NET_FRAME);
    mq_setd(1, 0, IO_TX, NET_FRAME, 0, 0);
    mq_give(net_base, 1, 0, 1);
    mq_wait(net_base, 1);
    long used = mq_wait(net_base, 0);
    int canary = io_canaries_ok();
    io_report(net_base, name, used);
    io_report_end(canary);
    int echoed = 0;
    net_recover(name, k, &echoed);
}
static void hostile_net(void) {
    int r = mq_setup(net_base, 2);
    puts("net-init="); puthex((u64)(r & 0xff), 2); puts("\n");
    if (r) return;
    int echoed = 0;
    net_recover("net-baseline", 0x7f, &echoed);
    u8 k = 1;
    /* Transmit chains and buffers. */
    io_arm(); net_frame(IO_TX, k, NET_FRAME);
    mq_setd(1, 0, IO_TX, 12, F_NEXT, 1); mq_setd(1, 1, IO_TX + 12, NET_FRAME - 12, F_NEXT, 0);
    net_tx_case("net-tx-loop", k++, 1);
    io_arm(); net_frame(IO_TX, k, NET_FRAME);
    mq_setd(1, 0, IO_TX, 12, F_NEXT, 1); mq_setd(1, 1, IO_TX + 12, NET_FRAME - 12, F_NEXT, 99);
    net_tx_case("net-tx-next-out-of-range", k++, 1);
    io_arm(); net_frame(IO_TX, k, NET_FRAME); mq_setd(1, 0, IO_TX, NET_FRAME, 0, 0);
    net_tx_case("net-tx-avail-index-jump", k++, 100);
    io_arm(); mq_setd(1, 0, 0x100000000ULL, NET_FRAME, 0, 0);
    net_tx_case("net-tx-outside-ram", k++, 1);
    io_arm(); mq_setd(1, 0, ram_end - 36, NET_FRAME, 0, 0);
    net_tx_case("net-tx-straddles-ram-end", k++, 1);
    io_arm(); mq_setd(1, 0, 0xffffffffffffffc0ULL, NET_FRAME, 0, 0);
    net_tx_case("net-tx-wraps", k++, 1);
    io_arm(); net_frame(IO_TX, k, NET_FRAME); mq_setd(1, 0, IO_TX, 0xffffffe0u, 0, 0);
    net_tx_case("net-tx-huge-length", k++, 1);
    io_arm(); net_frame(IO_TX, k, NET_FRAME); mq_setd(1, 0, IO_TX, 0, 0, 0);
    net_tx_case("net-tx-zero-length", k++, 1);
    io_arm(); net_frame(IO_TX, k, NET_FRAME); mq_setd(1, 0, IO_TX, 12 + 13, 0, 0);
    net_tx_case("net-tx-too-short", k++, 1);
    io_arm(); net_frame(IO_TX, k, 70000); mq_setd(1, 0, IO_TX, 70000, 0, 0);
    net_tx_case("net-tx-too-long", k++, 1);
    io_arm(); net_frame(IO_TX, k, NET_FRAME); mq_setd(1, 0, IO_TX, NET_FRAME, F_WRITE, 0);
    net_tx_case("net-tx-device-writable", k++, 1);
    /* A vnet header asking for checksum and segmentation offloads nobody negotiated: the
     * device sends the frame with an empty header instead. */
    io_arm(); net_frame(IO_TX, k, NET_FRAME);
    *(volatile u8 *)IO_TX = 1; *(volatile u8 *)(IO_TX + 1) = 4; *(volatile u16 *)(IO_TX + 2) = 0xffff;
    mq_setd(1, 0, IO_TX, NET_FRAME, 0, 0);
    net_tx_case("net-tx-offload-header", k++, 1);
    /* Receive buffers. */
    io_arm(); mq_setd(0, 0, 0x100000000ULL, RX_LEN, F_WRITE, 0);
    net_rx_case("net-rx-outside-ram", k++);
    io_arm(); mq_setd(0, 0, ram_end - 36, RX_LEN, F_WRITE, 0);
    net_rx_case("net-rx-straddles-ram-end", k++);
    io_arm(); mq_setd(0, 0, 0xffffffffffffffc0ULL, RX_LEN, F_WRITE, 0);
    net_rx_case("net-rx-wraps", k++);
    io_arm(); mq_setd(0, 0, IO_RX, 0xffffffe0u, F_WRITE, 0);
    net_rx_case("net-rx-huge-length", k++);
    io_arm(); mq_setd(0, 0, IO_RX, 20, F_WRITE, 0);
    net_rx_case("net-rx-too-small", k++);
    io_arm(); mq_setd(0, 0, IO_RX, RX_LEN, 0, 0);
    net_rx_case("net-rx-readonly", k++);
    /* A looping receive chain is no ring corruption the device can see before it writes
     * (virtio-queue ends the walk); it gets the frame in the buffers the loop names. */
    io_arm(); mq_setd(0, 0, IO_RX_LOOP, 16, F_WRITE | F_NEXT, 1); mq_setd(0, 1, IO_RX_LOOP + 16, 16, F_WRITE | F_NEXT, 0);
    net_rx_case("net-rx-loop", k++);
}

/* virtio-vsock: packets to the host (CID 2). Port 9 has no listener, so a connection
 * request there gets a RST: the probe every case ends with. */
struct vhdr { u64 src_cid, dst_cid; u32 src_port, dst_port, len; u16 type, op; u32 flags, buf_alloc, fwd_cnt; } __attribute__((packed));
#define VS_HDR IO_TX
#define VS_DATA (IO_TX + 0x100)
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
static void vs_hdr(u32 src_port, u32 dst_port, u16 op, u32 len) {
    volatile struct vhdr *h = (volatile struct vhdr *)VS_HDR;
    h->src_cid = vs_cid; h->dst_cid = 2; h->src_port = src_port; h->dst_port = dst_port;
    h->len = len; h->type = 1; h->op = op; h->flags = 0; h->buf_alloc = 65536; h->fwd_cnt = 0;
}
/* Sends the header (and `data_len` bytes at VS_DATA) as a well-formed chain. */
static long vs_send(u32 data_len) {
    mq_setd(1, 0, VS_HDR, 44, data_len ? F_NEXT : 0, 1);
    mq_setd(1, 1, VS_DATA, data_len, 0, 0);
    mq_give(vs_base, 1, 0, 1);
    return mq_wait(vs_base, 1);
}
/* Receives packets until one for guest port `port` that is not a credit update; returns
 * its op (0: nothing). Ops of packets for other ports go into *others, a hex digit each. */
static u16 vs_recv_for(u32 port, u64 *others) {
    for (int i = 0; i < 16; i++) {
        long used = mq_recv(vs_base);
        if (used < 44) return 0;
        volatile struct vhdr *h = (volatile struct vhdr *)IO_RX;
        if (h->dst_port == port && h->op != OP_CREDIT_UPDATE) return h->op;
        if (h->dst_port != port && others) *others = (*others << 4) | (h->op & 0xf);
    }
    return 0;
}
static u32 vs_probe_port = 4000;
/* Resets the device if it asked for it (*was), then asks for port 9 and waits for the RST;
 * packets that come first go into *others. */
static int vs_probe(int *was, u64 *others) {
    *was = needs_reset(vs_base);
    int r = *was ? mq_setup(vs_base, 3) : 0;
    u32 port = vs_probe_port++;
    vs_hdr(port, 9, OP_REQUEST, 0);
    return r == 0 && vs_send(0) == 0 && vs_recv_for(port, others) == OP_RST;
}
static void vs_recover(const char *name, u64 *others) {
    int was;
    int ok = vs_probe(&was, others);
    io_recover_line(name, was, ok);
}
static void vs_print_others(u64 others) {
    puts(" rx=");
    if (!others) puts("-");
    else puthex(others, 1 + (others > 0xf) + (others > 0xff));
}
/* A transmit case: descriptors 0.. of queue 1 hold the hostile chain. Prints the ops of the
 * packets the device sent back before the probe's RST (rx=3: a RST; rx=-: none). */
static void vs_tx_case(const char *name, u16 step) {
    mq_give(vs_base, 1, 0, step);
    long used = mq_wait(vs_base, 1);
    int canary = io_canaries_ok();
    io_report(vs_base, name, used);
    /* The probe comes after any answer to the hostile packet; a reset forgets both. */
    u64 others = 0;
    int was;
    int ok = vs_probe(&was, &others);
    vs_print_others(others);
    io_report_end(canary);
    io_recover_line(name, was, ok);
}
/* A receive case: descriptors 0.. of queue 0 hold the hostile buffer, then a request to
 * port 9 makes the device owe a RST. */
static void vs_rx_case(const char *name) {
    mq_give(vs_base, 0, 0, 1);
    vs_hdr(3999, 9, OP_REQUEST, 0);
    vs_send(0);
    long used = mq_wait(vs_base, 0);
    int canary = io_canaries_ok();
    io_report(vs_base, name, used);
    io_report_end(canary);
    u64 others = 0;
    vs_recover(name, &others);
}
/* Connects guest port `port` to host port 5000 (where the host echoes): 1 on RESPONSE. */
static int vs_connect(u32 port) {
    vs_hdr(port, 5000, OP_REQUEST, 0);
    return vs_send(0) == 0 && vs_recv_for(port, 0) == OP_RESPONSE;
}
/* A hostile packet on a live connection: the header is at VS_HDR, descriptors 0 and 1 of
 * queue 1 as the case sets them. Prints the op the connection got back (3: reset). */
static void vs_conn_case(const char *name, u32 port) {
    mq_give(vs_base, 1, 0, 1);
    long used = mq_wait(vs_base, 1);
    int canary = io_canaries_ok();
    io_report(vs_base, name, used);
    u16 op = used >= 0 ? vs_recv_for(port, 0) : 0;
    puts(" conn-op="); puthex(op, 1);
    io_report_end(canary);
    u64 others = 0;
    vs_recover(name, &others);
}
static void hostile_vsock(void) {
    vs_cid = (u64)mmio_read(vs_base + R_CONFIG) | ((u64)mmio_read(vs_base + R_CONFIG + 4) << 32);
    int r = mq_setup(vs_base, 3);
    puts("vsock-init="); puthex((u64)(r & 0xff), 2); puts(" cid="); puthex(vs_cid, 2); puts("\n");
    if (r) return;
    u64 others = 0;
    vs_recover("vsock-baseline", &others);
    /* An echo on a live connection: the host gets the bytes and sends them back. */
    {
        volatile u8 *d = (volatile u8 *)VS_DATA;
        int ok = vs_connect(3000);
        for (int i = 0; i < 5; i++) d[i] = (u8)"hello"[i];
        vs_hdr(3000, 5000, OP_RW, 5);
        ok = ok && vs_send(5) == 0 && vs_recv_for(3000, 0) == OP_RW;
        volatile u8 *rx = (volatile u8 *)(IO_RX + 44);
        ok = ok && ((volatile struct vhdr *)IO_RX)->len == 5 && rx[0] == 'h' && rx[4] == 'o';
        vs_hdr(3000, 5000, OP_RST, 0);
        ok = ok && vs_send(0) == 0;
        puts("vsock-echo ok="); puthex(ok, 1); puts("\n");
    }
    /* Transmit chains and buffers. */
    io_arm(); vs_hdr(3100, 9, OP_REQUEST, 0); mq_setd(1, 0, VS_HDR, 44, F_NEXT, 1); mq_setd(1, 1, VS_DATA, 8, F_NEXT, 0);
    vs_tx_case("vsock-tx-loop", 1);
    io_arm(); vs_hdr(3101, 9, OP_REQUEST, 0); mq_setd(1, 0, VS_HDR, 44, F_NEXT, 77);
    vs_tx_case("vsock-tx-next-out-of-range", 1);
    io_arm(); vs_hdr(3102, 9, OP_REQUEST, 0); mq_setd(1, 0, VS_HDR, 44, 0, 0);
    vs_tx_case("vsock-tx-avail-index-jump", 100);
    io_arm(); mq_setd(1, 0, 0x100000000ULL, 44, 0, 0);
    vs_tx_case("vsock-tx-header-outside-ram", 1);
    io_arm(); mq_setd(1, 0, ram_end - 20, 44, 0, 0);
    vs_tx_case("vsock-tx-header-straddles-ram-end", 1);
    io_arm(); mq_setd(1, 0, 0xfffffffffffffff0ULL, 44, 0, 0);
    vs_tx_case("vsock-tx-header-wraps", 1);
    io_arm(); vs_hdr(3103, 9, OP_REQUEST, 0); mq_setd(1, 0, VS_HDR, 40, 0, 0);
    vs_tx_case("vsock-tx-header-short", 1);
    io_arm(); vs_hdr(3104, 9, OP_REQUEST, 0); mq_setd(1, 0, VS_HDR, 44, F_WRITE, 0);
    vs_tx_case("vsock-tx-header-device-writable", 1);
    io_arm(); vs_hdr(3105, 9, OP_REQUEST, 0); mq_setd(1, 0, VS_HDR, 0, 0, 0);
    vs_tx_case("vsock-tx-zero-length", 1);
    /* Headers that parse but make no sense. */
    io_arm(); vs_hdr(3106, 9, OP_REQUEST, 0); ((volatile struct vhdr *)VS_HDR)->src_cid = 77; mq_setd(1, 0, VS_HDR, 44, 0, 0);
    vs_tx_case("vsock-tx-spoofed-source-cid", 1);
    io_arm(); vs_hdr(3107, 9, OP_REQUEST, 0); ((volatile struct vhdr *)VS_HDR)->dst_cid = 77; mq_setd(1, 0, VS_HDR, 44, 0, 0);
    vs_tx_case("vsock-tx-other-destination-cid", 1);
    io_arm(); vs_hdr(3108, 5000, OP_REQUEST, 0); ((volatile struct vhdr *)VS_HDR)->type = 9; mq_setd(1, 0, VS_HDR, 44, 0, 0);
    vs_tx_case("vsock-tx-unknown-type", 1);
    io_arm(); vs_hdr(3109, 5000, 0x77, 0); mq_setd(1, 0, VS_HDR, 44, 0, 0);
    vs_tx_case("vsock-tx-unknown-op", 1);
    io_arm(); vs_hdr(3110, 5000, OP_RW, 8); mq_setd(1, 0, VS_HDR, 44, F_NEXT, 1); mq_setd(1, 1, VS_DATA, 8, 0, 0);
    vs_tx_case("vsock-tx-data-without-connection", 1);
    io_arm(); vs_hdr(3111, 9, OP_RW, 16); mq_setd(1, 0, VS_HDR, 44, F_NEXT, 1); mq_setd(1, 1, VS_DATA, 0xffff0000u, 0, 0);
    vs_tx_case("vsock-tx-huge-length", 1);
    /* Header and data add up to more than 4 GiB: virtio-queue stops there, like at a loop. */
    io_arm(); vs_hdr(3112, 9, OP_RW, 16); mq_setd(1, 0, VS_HDR, 44, F_NEXT, 1); mq_setd(1, 1, VS_DATA, 0xffffffe0u, 0, 0);
    vs_tx_case("vsock-tx-chain-over-4g", 1);
    /* Bad packets on live connections to port 5000: each resets its connection. */
    vs_connect(3200);
    io_arm(); vs_hdr(3200, 5000, OP_RW, 100); mq_setd(1, 0, VS_HDR, 44, F_NEXT, 1); mq_setd(1, 1, VS_DATA, 10, 0, 0);
    vs_conn_case("vsock-conn-len-exceeds-data", 3200);
    vs_connect(3201);
    io_arm(); vs_hdr(3201, 5000, OP_RW, 16); mq_setd(1, 0, VS_HDR, 44, F_NEXT, 1); mq_setd(1, 1, 0x100000000ULL, 16, 0, 0);
    vs_conn_case("vsock-conn-data-outside-ram", 3201);
    vs_connect(3202);
    io_arm(); vs_hdr(3202, 5000, OP_RW, 16); mq_setd(1, 0, VS_HDR, 44, F_NEXT, 1); mq_setd(1, 1, VS_DATA, 16, F_WRITE, 0);
    vs_conn_case("vsock-conn-data-device-writable", 3202);
    vs_connect(3203);
    io_arm(); vs_hdr(3203, 5000, OP_RW, 0x7fffffffu); mq_setd(1, 0, VS_HDR, 44, F_NEXT, 1); mq_setd(1, 1, VS_DATA, 16, 0, 0);
    vs_conn_case("vsock-conn-len-above-max", 3203);
    /* Receive buffers: the owed RST meets them. */
    io_arm(); mq_setd(0, 0, 0x100000000ULL, RX_LEN, F_WRITE, 0);
    vs_rx_case("vsock-rx-outside-ram");
    io_arm(); mq_setd(0, 0, ram_end - 20, RX_LEN, F_WRITE, 0);
    vs_rx_case("vsock-rx-straddles-ram-end");
    io_arm(); mq_setd(0, 0, 0xfffffffffffffff0ULL, RX_LEN, F_WRITE, 0);
    vs_rx_case("vsock-rx-wraps");
    io_arm(); mq_setd(0, 0, IO_RX, 40, F_WRITE, 0);
    vs_rx_case("vsock-rx-too-small");
    io_arm(); mq_setd(0, 0, IO_RX, RX_LEN, 0, 0);
    vs_rx_case("vsock-rx-readonly");
    io_arm(); mq_setd(0, 0, IO_RX_LOOP, 44, F_WRITE | F_NEXT, 1); mq_setd(0, 1, IO_RX_LOOP + 44, 16, F_WRITE | F_NEXT, 0);
    vs_rx_case("vsock-rx-loop");
}

static void test_hostile_io(void) {
    ram_end = find_ram_end();
    net_base = find_device(1);
    vs_base = find_device(19);
    puts("hostile-io-start ram-end="); puthex(ram_end, 8);
    puts(" net="); puthex(net_base, 8); puts(" vsock="); puthex(vs_base, 8); puts("\n");
    if (!net_base || !vs_base || ram_end < 0x1000000) return;
    /* The host brings the TAP up and starts its echo, then sends a byte. */
    puts("hostile-io-wait\n");
    while (!(inb(SERIAL + 5) & 1)) {}
    (void)inb(SERIAL);
    hostile_net();
    hostile_vsock();
    puts("hostile-done\n");
    while (!(inb(SERIAL + 5) & 1)) {}
    puts("hostile-exit\n");
}

void guest_main(const u8 *zero_page) {
    zero_page_ptr = zero_page;
    const char *cmdline = (const char *)(u64)(*(const u32 *)(zero_page + 0x228));
    const char *t = find_test(cmdline);
    puts("grove-test-guest: ");
    for (const char *c = t; *c && *c != ' '; c++) putc(*c);
    puts("\n");
    outb(0x3f0, 123); /* boot complete */
    if (is_test(t, "serial")) puts("hello from the test guest\n");
    else if (is_test(t, "pio-mmio")) test_pio_mmio();
    else if (is_test(t, "blk")) test_blk();
    else if (is_test(t, "rng")) test_rng();
    else if (is_test(t, "counter")) test_counter();
    else if (is_test(t, "dirty")) test_dirty();
    else if (is_test(t, "cpuid")) test_cpuid();
    else if (is_test(t, "vmgenid")) test_vmgenid();
    else if (is_test(t, "hostile")) test_hostile();
    else if (is_test(t, "hostile-io")) test_hostile_io();
    else if (is_test(t, "triple-fault")) {
        /* Empty IDT, then a #GP from a non-canonical address: #GP -> #DF -> triple fault.
         * (Not int3: the PVM emulator cannot execute it.) */
        struct { u16 limit; u64 base; } __attribute__((packed)) idt = {0, 0};
        __asm__ volatile("lidt %0; movq 0x8000000000000000, %%rax" : : "m"(idt) : "rax");
    } else if (is_test(t, "halt")) {
        /* Interrupts off and halted: the VM never exits on its own. */
        __asm__ volatile("cli; hlt");
    } else puts("unknown test\n");
    puts("done\n");
    reset();
}
