/*
 * The `scratch` test image's only program (/probe): prints what a process started from an image
 * sees, one item per line, so a test can compare it with what the image and the command line ask
 * for:
 *
 *   argv=["/probe","a b","c\"d"]     every argument, argv[0] included, as a JSON list of strings
 *   cwd=/data                         getcwd(), or cwd=? when it fails
 *   uid=1000 gid=2000 groups=2000,5   real uid and gid, getgroups() in the kernel's order
 *   env:FOO=from-image                every environment variable, sorted bytewise
 *
 * Exit status 0, or N when the first argument is `exit=N`. Built static (gcc -static), so the
 * image needs nothing else: no shell, no libc, no /etc/passwd.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

extern char **environ;

static void json_string(const char *s) {
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"': fputs("\\\"", stdout); break;
        case '\\': fputs("\\\\", stdout); break;
        case '\n': fputs("\\n", stdout); break;
        case '\t': fputs("\\t", stdout); break;
        case '\r': fputs("\\r", stdout); break;
        default:
            if (*p < 0x20)
                printf("\\u%04x", *p);
            else
                putchar(*p);
        }
    }
    putchar('"');
}

static int compare(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(int argc, char **argv) {
    fputs("argv=[", stdout);
    for (int i = 0; i < argc; i++) {
        if (i)
            putchar(',');
        json_string(argv[i]);
    }
    puts("]");

    char cwd[PATH_MAX];
    printf("cwd=%s\n", getcwd(cwd, sizeof cwd) ? cwd : "?");

    printf("uid=%u gid=%u groups=", (unsigned)getuid(), (unsigned)getgid());
    int n = getgroups(0, NULL);
    if (n > 0) {
        gid_t *groups = calloc((size_t)n, sizeof *groups);
        if (groups) {
            n = getgroups(n, groups);
            for (int i = 0; i < n; i++)
                printf("%s%u", i ? "," : "", (unsigned)groups[i]);
            free(groups);
        }
    }
    putchar('\n');

    size_t count = 0;
    while (environ && environ[count])
        count++;
    if (count) {
        char **vars = calloc(count, sizeof *vars);
        if (vars) {
            memcpy(vars, environ, count * sizeof *vars);
            qsort(vars, count, sizeof *vars, compare);
            for (size_t i = 0; i < count; i++)
                printf("env:%s\n", vars[i]);
            free(vars);
        }
    }

    if (fflush(stdout) != 0)
        return 125;
    if (argc > 1 && strncmp(argv[1], "exit=", 5) == 0)
        return atoi(argv[1] + 5);
    return 0;
}
