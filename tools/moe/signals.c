/* signals.c: Ctrl-C and SIGTERM for the commands that stop cleanly (train,
 * generate, eval): the first signal asks the library to stop after the
 * current step or batch, a second one leaves at once. Apart from main.c so
 * that the CLI library the fuzz targets link holds it too. */
#include "cli.h"

#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

/* ---- stop signals ----
 * The handler may run on any thread (OpenMP workers included): it only swaps a
 * lock-free atomic, calls moe_request_stop (itself an atomic store), write()s
 * and _exit()s, all async-signal-safe. */
static atomic_int first_signal;
static const char *stop_note, *stop_second;

static void write_text(const char *s) {
    if (!s) return;
    size_t n = strlen(s);
    while (n) {
        ssize_t w = write(STDERR_FILENO, s, n);
        if (w <= 0) return;
        s += w;
        n -= (size_t)w;
    }
}

static void on_stop_signal(int sig) {
    if (atomic_exchange(&first_signal, sig)) { /* the second: no more waiting */
        write_text(stop_second);
        _exit(CLI_SIGNAL_STATUS(sig));
    }
    moe_request_stop();
    write_text(stop_note);
}

static void set_stop_handlers(void (*handler)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = SA_RESTART; /* reads and writes go on; the work stops at its own pace */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

void cli_catch_stop_signals(const char *note, const char *second) {
    stop_note = note;
    stop_second = second;
    atomic_store(&first_signal, 0);
    set_stop_handlers(on_stop_signal);
}

void cli_release_stop_signals(void) { set_stop_handlers(SIG_DFL); }

int cli_stop_signal(void) { return atomic_load(&first_signal); }
