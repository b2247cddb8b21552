/*
 * /sbin/init of Grove's default image: the first user-space program, kept tiny so that the
 * boot-complete signal comes as soon as user space runs. Under the emulated guest kernel
 * mode of Grove's CI hosts, reading a 2 MB busybox from disk and forking costs seconds; this
 * program is a few KiB and makes only system calls (no libc).
 *
 * 1. Writes 123 to I/O port 0x3f0 through /dev/port: the VMM timestamps it (boot complete).
 * 2. Mounts proc, sysfs, and tmpfs on /run and /tmp.
 * 3. Prints GROVE-INIT-READY on the console.
 * 4. If the kernel command line has the word grove.bench=boot, syncs and resets the machine
 *    (the VMM treats the reset as a clean exit).
 * 5. Starts the guest agent /usr/bin/grove-agent in its own session (fork + exec, not waited
 *    for): the earliest point where /proc, /run and /tmp exist, and it runs while the shell
 *    below loads busybox, so the host can reach the agent as early as possible.
 * 6. Hands over to the busybox script /etc/grove/rc (network defaults, console shell, reset
 *    on exit).
 * If anything fails it says so on the console and resets, rather than leaving a hung guest.
 */
typedef unsigned long u64;
typedef long i64;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_pwrite64 18
#define SYS_fork 57
#define SYS_execve 59
#define SYS_setsid 112
#define SYS_exit_group 231
#define SYS_sync 162
#define SYS_mount 165
#define SYS_reboot 169
#define O_RDONLY 0
#define O_WRONLY 1
#define MS_NOSUID 2
#define MS_NODEV 4
#define MS_NOEXEC 8
#define LINUX_REBOOT_MAGIC1 0xfee1dead
#define LINUX_REBOOT_MAGIC2 672274793
#define LINUX_REBOOT_CMD_RESTART 0x01234567

static i64 sys(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e) {
    i64 ret;
    register i64 r10 __asm__("r10") = d;
    register i64 r8 __asm__("r8") = e;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return ret;
}

static i64 len(const char *s) {
    i64 n = 0;
    while (s[n]) n++;
    return n;
}

static void say(const char *s) { sys(SYS_write, 1, (i64)s, len(s), 0, 0); }

static void reset(void) {
    sys(SYS_sync, 0, 0, 0, 0, 0);
    sys(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART, 0, 0);
    for (;;) {}
}

static void fail(const char *what) {
    say("grove-init: ");
    say(what);
    say(" failed\n");
    reset();
}

static void mount(const char *src, const char *dir, const char *type, u64 flags, const char *data) {
    if (sys(SYS_mount, (i64)src, (i64)dir, (i64)type, (i64)flags, (i64)data) < 0) fail(dir);
}

/* Whether `word` appears in `s` delimited by spaces, newline or the ends. */
static int has_word(const char *s, const char *word) {
    i64 n = len(word);
    for (const char *p = s; *p; p++) {
        if (p != s && p[-1] != ' ') continue;
        i64 i = 0;
        while (i < n && p[i] == word[i]) i++;
        if (i == n && (p[n] == 0 || p[n] == ' ' || p[n] == '\n')) return 1;
    }
    return 0;
}

/* Starts the guest agent in a child process with its own session (so console job control
 * never signals it) and a fixed environment; the agent's commands inherit it. A failure is
 * reported on the console and boot goes on: the console still works without the agent. */
static void start_agent(void) {
    i64 pid = sys(SYS_fork, 0, 0, 0, 0, 0);
    if (pid < 0) {
        say("grove-init: cannot fork for grove-agent\n");
        return;
    }
    if (pid > 0) return;
    sys(SYS_setsid, 0, 0, 0, 0, 0);
    char *argv[] = {"grove-agent", 0};
    char *env[] = {"PATH=/sbin:/usr/sbin:/bin:/usr/bin", "HOME=/root", 0};
    sys(SYS_execve, (i64)"/usr/bin/grove-agent", (i64)argv, (i64)env, 0, 0);
    say("grove-init: exec /usr/bin/grove-agent failed\n");
    sys(SYS_exit_group, 127, 0, 0, 0, 0);
}

void grove_init(char **envp) {
    i64 fd = sys(SYS_open, (i64)"/dev/port", O_WRONLY, 0, 0, 0);
    if (fd >= 0) {
        char value = 123;
        sys(SYS_pwrite64, fd, (i64)&value, 1, 0x3f0, 0);
        sys(SYS_close, fd, 0, 0, 0, 0);
    } else {
        say("grove-init: no /dev/port, boot completion not signalled\n");
    }

    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0);
    mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0);
    mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    say("GROVE-INIT-READY\n");

    static char cmdline[4096];
    i64 cfd = sys(SYS_open, (i64)"/proc/cmdline", O_RDONLY, 0, 0, 0);
    if (cfd >= 0) {
        i64 n = sys(SYS_read, cfd, (i64)cmdline, sizeof(cmdline) - 1, 0, 0);
        cmdline[n > 0 ? n : 0] = 0;
        sys(SYS_close, cfd, 0, 0, 0, 0);
    }
    if (has_word(cmdline, "grove.bench=boot")) reset();

    start_agent();

    char *argv[] = {"sh", "/etc/grove/rc", 0};
    sys(SYS_execve, (i64)"/bin/sh", (i64)argv, (i64)envp, 0, 0);
    fail("exec /bin/sh /etc/grove/rc");
}

/* Entry: the kernel starts init with argc, argv..., 0, envp..., 0 on the stack. */
__asm__(".globl _start\n"
        "_start:\n"
        "  mov (%rsp), %rdi\n"       /* argc */
        "  lea 16(%rsp,%rdi,8), %rdi\n" /* envp = &argv[argc + 1] */
        "  and $-16, %rsp\n"
        "  call grove_init\n"
        "  hlt\n");
