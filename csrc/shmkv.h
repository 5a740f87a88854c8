/* shmkv.h -- include guard and the standard headers around the one API header. */
#ifndef SHMKV_H
#define SHMKV_H
#include <stddef.h>
#include <stdint.h>
#include "shmkv_api.h"
#endif
