#ifndef GREET_H
#define GREET_H

/* Print "Hello, NAME" and the punctuation chosen at build time.
 * Returns 0, or -1 if writing failed. */
int greet(const char *name);

#endif
