/* stats/jsonl: the JSON the routing tools write and the JSON Lines they
 * read back (the training log), kept small: strings and numbers out, flat
 * objects of numbers and arrays of numbers in. */
#ifndef MOE_STATS_JSONL_H
#define MOE_STATS_JSONL_H
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>

/* s[len] as a quoted JSON string: quote, backslash and control characters
 * escaped, '<', '>' and '&' as \u escapes (so the text can sit inside an
 * HTML <script>), bytes that are not valid UTF-8 as U+FFFD. */
void json_string(FILE *f, const char *s, size_t len);
/* A number with 6 significant digits, or null when not finite. */
void json_number(FILE *f, double v);

/* One token's routing as moe route --json writes it:
 * [{"layer":L,"experts":[..],"weights":[..]},...] for the n_moe MoE layers
 * (model layers layers[]) of ids/w[n_moe][k]; only >= 0: that one alone. */
void json_route_layers(FILE *f, const int *layers, int n_moe, int k, const int32_t *ids, const float *w, int only);

/* From one JSON Lines object: the number at "key" (1 if found), or the
 * array of numbers at "key" into v[cap] (its length, at most cap; -1 when
 * absent or not an array). null elements read as NaN. Only top-level keys
 * of flat objects are looked for, as the training log writes them. */
int jsonl_number(const char *line, const char *key, double *v);
int jsonl_array(const char *line, const char *key, double *v, int cap);
#endif
