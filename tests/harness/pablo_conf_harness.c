// A test harness around the fork's real pablo.conf reader (ggml-pablo-conf.c), built with
// AddressSanitizer and UndefinedBehaviorSanitizer by tests/test_conf_differential.py.
//
// Reads one configuration path a line on stdin; for each, runs ggml_pablo_begin() with
// PABLO_CONF set to it and writes one record a line on stdout, fields separated by NUL
// bytes (no field can hold one: the reader rejects NUL bytes):
//   E <message>
//   K <mode> <radius> <table name|off> <table path> <lo,..> <hi,..> <level,..> <hist_out>
//     then for each TENSOR rule: <pattern> <line> <radius|-> <table name|off|-> <table path> <lo,..> <hi,..> <level,..>
#include "ggml-pablo.h"
#include "ggml-pablo-impl.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// what the reader needs from the rest of ggml, stubbed: logging, and the histograms' reset
void ggml_log_internal(enum ggml_log_level level, const char * format, ...) { (void) level; (void) format; }
void pablo_hist_free(void) {}

static void ints(const int * v) {
    for (int i = 0; i < 16; i++) printf("%s%d", i ? "," : "", v[i]);
}

int main(void) {
    static char path[1 << 16];
    while (fgets(path, sizeof(path), stdin)) {
        path[strcspn(path, "\n")] = '\0';
        setenv("PABLO_CONF", path, 1);
        const char * err = ggml_pablo_begin();
        if (err) {
            printf("E%c%s\n", 0, err);
        } else {
            const struct pablo_state * s = &pablo_g;
            printf("K%c%s%c%d%c", 0, s->pablo ? "pablo" : "simple", 0, s->radius, 0);
            if (s->table_on) {
                printf("%s%c%s%c", s->table.name, 0, s->table.path, 0);
                ints(s->table.lo); putchar(0); ints(s->table.hi); putchar(0); ints(s->table.level); putchar(0);
            } else {
                printf("off%c%c%c%c%c", 0, 0, 0, 0, 0);
            }
            printf("%s", s->hist_out);
            for (int i = 0; i < s->n_rules; i++) {
                const struct pablo_rule * r = &s->rules[i];
                printf("%c%s%c%d%c", 0, r->pattern, 0, r->line, 0);
                r->set_radius ? printf("%d%c", r->radius, 0) : printf("-%c", 0);
                if (r->table_on) {
                    printf("%s%c%s%c", r->table.name, 0, r->table.path, 0);
                    ints(r->table.lo); putchar(0); ints(r->table.hi); putchar(0); ints(r->table.level);
                } else {
                    printf("%s%c%c%c%c", r->set_table ? "off" : "-", 0, 0, 0, 0);
                }
            }
            putchar('\n');
        }
        fflush(stdout);
        ggml_pablo_end();
    }
    return 0;
}
