/* The least any page_idle user must do for one mark+read of a range, in C without checks: read pagemap, set
 * the bits of its PFNs in /sys/kernel/mm/page_idle/bitmap (4 KiB per write), read those words back, read
 * pagemap again (to notice frames that changed). No kpageflags (so no THP heads, no LRU filter).
 * Usage: page_idle_floor PID START_HEX BYTES REPEATS -> prints "pagemap_s floor_s", means per repeat (the
 * guest's clock may tick in 4 ms jiffies under TCG: the pagemap loop runs for at least 100 ms). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void pread_all(int fd, void *buf, size_t n, off_t off) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, (char *)buf + done, n - done, off + done);
        if (r <= 0) { perror("pread"); exit(1); }
        done += r;
    }
}

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: %s PID START_HEX BYTES REPEATS\n", argv[0]); return 2; }
    char path[64];
    snprintf(path, sizeof path, "/proc/%s/pagemap", argv[1]);
    uint64_t start = strtoull(argv[2], NULL, 16), bytes = strtoull(argv[3], NULL, 0);
    int repeats = atoi(argv[4]);
    size_t n = bytes >> 12;
    int pm = open(path, O_RDONLY), bm = open("/sys/kernel/mm/page_idle/bitmap", O_RDWR);
    if (pm < 0 || bm < 0) { perror("open"); return 1; }
    uint64_t *ent = malloc(n * 8), *ent2 = malloc(n * 8);
    double t_pm = now();
    int n_pm = 0;
    while (n_pm < repeats || now() - t_pm < 0.1) {
        pread_all(pm, ent, n * 8, (start >> 12) * 8);
        n_pm++;
    }
    t_pm = (now() - t_pm) / n_pm;
    double t_floor = now();
    for (int r = 0; r < repeats; r++) {
        pread_all(pm, ent, n * 8, (start >> 12) * 8);
        uint64_t lo = UINT64_MAX, hi = 0;
        for (size_t i = 0; i < n; i++) {
            if (!(ent[i] >> 63)) continue;
            uint64_t pfn = ent[i] & ((1ULL << 55) - 1);
            if (pfn < lo) lo = pfn;
            if (pfn > hi) hi = pfn;
        }
        if (hi < lo) { fprintf(stderr, "nothing present\n"); return 1; }
        size_t w0 = lo / 64, nw = hi / 64 - w0 + 1;
        uint64_t *words = calloc(nw, 8);
        for (size_t i = 0; i < n; i++)
            if (ent[i] >> 63) {
                uint64_t pfn = ent[i] & ((1ULL << 55) - 1);
                words[pfn / 64 - w0] |= 1ULL << (pfn % 64);
            }
        for (size_t w = 0; w < nw; w += 512) {          /* mark */
            size_t c = nw - w < 512 ? nw - w : 512;
            if (pwrite(bm, words + w, c * 8, (w0 + w) * 8) < 0) { perror("pwrite"); return 1; }
        }
        for (size_t w = 0; w < nw; w += 512) {          /* read */
            size_t c = nw - w < 512 ? nw - w : 512;
            if (pread(bm, words + w, c * 8, (w0 + w) * 8) < 0) { perror("pread bitmap"); return 1; }
        }
        pread_all(pm, ent2, n * 8, (start >> 12) * 8);  /* re-check the frames */
        free(words);
    }
    t_floor = (now() - t_floor) / repeats;
    printf("%.6f %.6f\n", t_pm, t_floor);
    return 0;
}
