/* dist: helpers the two transports share (dist.c). */
#ifndef MOE_DIST_INTERNAL_H
#define MOE_DIST_INTERNAL_H
#include "dist/dist.h"
double dist_timeout_from_env(void);
#endif
