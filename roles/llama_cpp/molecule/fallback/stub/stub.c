#include <stdio.h>
#include <string.h>
#ifdef STUB_BLAS
#define PP 200.0
#define TG 9.0
#else
#define PP 100.0
#define TG 10.0
#endif
int main(int argc, char **argv) {
  for (int i = 1; i < argc; i++) if (!strcmp(argv[i], "json")) {
    printf("[{\"n_prompt\":64,\"n_gen\":0,\"avg_ts\":%f},{\"n_prompt\":0,\"n_gen\":32,\"avg_ts\":%f}]\n", PP, TG);
    return 0;
  }
  printf("usage: stub\n");
  return 0;
}
