/* vmsight guest workload: a process with a known memory access pattern, for tests run in the busybox guest.
 *
 *   vmsight-workload PAGES [thp|nothp|high] CMDFILE REPLYFILE
 *
 * Maps PAGES pages (2 MiB-aligned; MADV_HUGEPAGE with "thp"; with "high", no THP and a hint of 2^52, above the
 * 47-bit default window, which only a 5-level kernel honours), writes every page once, then prints
 * "ready <addr hex> <bytes>" to REPLYFILE and waits. On SIGUSR1 it executes the one command in CMDFILE and
 * appends "done <seq> <result>" to REPLYFILE:
 *   touch I,J,K   write one byte in each listed page (index within the mapping)
 *   pageout I N   madvise(MADV_PAGEOUT) pages [I, I+N)
 *   exit
 * Static, no libc beyond what -static gives: the busybox guest has no shared libraries. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif
#define PAGE 4096UL
#define HUGE (2UL << 20)

static volatile sig_atomic_t pending;
static void on_usr1(int sig) { (void)sig; pending = 1; }

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s PAGES thp|nothp|high CMDFILE REPLYFILE\n", argv[0]);
        return 2;
    }
    unsigned long pages = strtoul(argv[1], NULL, 0), size = pages * PAGE;
    int thp = strcmp(argv[2], "thp") == 0;
    void *hint = strcmp(argv[2], "high") == 0 ? (void *)(1UL << 52) : NULL;
    const char *cmdfile = argv[3], *replyfile = argv[4];
    char *raw = mmap(hint, size + HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) { perror("mmap"); return 1; }
    char *base = (char *)(((unsigned long)raw + HUGE - 1) & ~(HUGE - 1));
    if (madvise(base, size, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) != 0) perror("madvise");
    for (unsigned long i = 0; i < pages; i++) base[i * PAGE] = 1;

    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigprocmask(SIG_BLOCK, &block, &old);

    FILE *out = fopen(replyfile, "a");
    if (!out) { perror(replyfile); return 1; }
    fprintf(out, "ready %#lx %lu\n", (unsigned long)base, size);
    fflush(out);
    for (unsigned long seq = 1;; seq++) {
        while (!pending) sigsuspend(&old);
        pending = 0;
        char cmd[1 << 16] = {0};
        FILE *in = fopen(cmdfile, "r");
        if (!in || !fgets(cmd, sizeof cmd, in)) { fprintf(out, "done %lu error\n", seq); fflush(out); continue; }
        fclose(in);
        long result = 0;
        if (strncmp(cmd, "touch ", 6) == 0) {
            for (char *p = cmd + 6; *p && *p != '\n';) {
                unsigned long i = strtoul(p, &p, 10);
                if (i < pages) { base[i * PAGE]++; result++; }
                if (*p == ',') p++;
                else break;
            }
        } else if (strncmp(cmd, "pageout ", 8) == 0) {
            unsigned long i = 0, n = 0;
            sscanf(cmd + 8, "%lu %lu", &i, &n);
            result = madvise(base + i * PAGE, n * PAGE, MADV_PAGEOUT) == 0 ? 0 : -errno;
        } else if (strncmp(cmd, "exit", 4) == 0) {
            fprintf(out, "done %lu 0\n", seq);
            fclose(out);
            return 0;
        }
        fprintf(out, "done %lu %ld\n", seq, result);
        fflush(out);
    }
}
