#include <stdio.h>

#include "greet.h"

#ifndef GREET_PUNCT
#define GREET_PUNCT "!"
#endif

int greet(const char *name)
{
    return printf("Hello, %s%s\n", name, GREET_PUNCT) < 0 ? -1 : 0;
}
