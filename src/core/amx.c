/* core/amx: permission to use the AMX tile registers.
 *
 * Linux keeps the tile data state (XFEATURE_XTILEDATA, 8 KiB per thread) off
 * until a process asks for it; the first tile instruction without it dies
 * with SIGILL. The request is process-wide and inherited by every thread, so
 * it is made once (pthread_once). Every AMX kernel (int8 and bf16) calls
 * moe_amx_enable() before its first tile and falls back to its AVX-512 twin
 * when it returns 0. Each thread still loads its own tile configuration. */
#include "core/core.h"

#include <pthread.h>
#include <string.h>

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>

enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };

static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static int amx_granted;

static void request_tiles(void) {
    const moe_cpu_features *c = moe_cpu();
    if (!c->amx_tile) return;
    amx_granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

int moe_amx_enable(void) {
    pthread_once(&amx_once, request_tiles);
    return amx_granted;
}

/* the configuration this thread's tiles hold; valid = 0 after a release */
static _Thread_local struct {
    int valid;
    moe_amx_tilecfg cfg;
} loaded;

void moe_amx_load_config(const moe_amx_tilecfg *c) {
    if (loaded.valid && memcmp(&loaded.cfg, c, sizeof *c) == 0) return;
    /* the memory operand names all 64 bytes, so every store before it stays */
    __asm__ volatile("ldtilecfg %0" : : "m"(*c));
    loaded.cfg = *c;
    loaded.valid = 1;
}

void moe_amx_release(void) {
    if (!loaded.valid) return;
    __asm__ volatile("tilerelease" ::: "memory");
    loaded.valid = 0;
}
#else
void moe_amx_load_config(const moe_amx_tilecfg *c) { (void)c; }
void moe_amx_release(void) {}
int moe_amx_enable(void) { return 0; }
#endif
