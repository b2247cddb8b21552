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

static int virtio_init(u64 base, u32 want_low_features) {
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
    mmio_write(base + R_QUEUE_SEL, 0);
    if (mmio_read(base + R_QUEUE_NUM_MAX) < QSIZE) return -4;
    mmio_write(base + R_QUEUE_NUM, QSIZE);
    mmio_write(base + R_DESC_LO, (u32)DESC_TABLE);
    mmio_write(base + R_DESC_HI, 0);
    mmio_write(base + R_DRIVER_LO, (u32)AVAIL_RING);
    mmio_write(base + R_DRIVER_HI, 0);
    mmio_write(base + R_DEVICE_LO, (u32)USED_RING);
    mmio_write(base + R_DEVICE_HI, 0);
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

void guest_main(const u8 *zero_page) {
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
