/* Work for the optimiser. No #include, so that compiling it reads the compiler, not headers.
   Loops to unroll and vectorise, structs, a hash table, a sort and a parser to inline. */

typedef unsigned long size_t;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NULL ((void *)0)
#define ARENA_BYTES (1 << 16)
#define TABLE_BITS 9
#define TABLE_SIZE (1u << TABLE_BITS)
#define N 24
#define SIEVE_LIMIT 8192

static unsigned char arena[ARENA_BYTES];
static size_t arena_used;

static void *arena_alloc(size_t n)
{
    size_t aligned = (n + 15) & ~(size_t)15;
    if (arena_used + aligned > ARENA_BYTES)
        return NULL;
    void *p = &arena[arena_used];
    arena_used += aligned;
    return p;
}

static size_t str_len(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

static int str_eq(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

static char *str_ndup(const char *s, size_t n)
{
    char *copy = arena_alloc(n + 1);
    if (!copy)
        return NULL;
    for (size_t i = 0; i < n; i++)
        copy[i] = s[i];
    copy[n] = '\0';
    return copy;
}

static u32 fnv1a(const char *s)
{
    u32 h = 2166136261u;
    while (*s) {
        h ^= (unsigned char)*s++;
        h *= 16777619u;
    }
    return h;
}

struct entry {
    const char *key;
    long count;
    struct entry *next;
};

struct table {
    struct entry *slots[TABLE_SIZE];
    size_t len;
};

static struct table words;

static struct entry *table_find(struct table *t, const char *key)
{
    struct entry *e = t->slots[fnv1a(key) & (TABLE_SIZE - 1)];
    while (e && !str_eq(e->key, key))
        e = e->next;
    return e;
}

static int table_add(struct table *t, const char *key, size_t len)
{
    char *copy = str_ndup(key, len);
    if (!copy)
        return -1;
    struct entry *e = table_find(t, copy);
    if (e) {
        e->count++;
        return 0;
    }
    e = arena_alloc(sizeof *e);
    if (!e)
        return -1;
    u32 slot = fnv1a(copy) & (TABLE_SIZE - 1);
    e->key = copy;
    e->count = 1;
    e->next = t->slots[slot];
    t->slots[slot] = e;
    t->len++;
    return 0;
}

static long table_weight(const struct table *t)
{
    long total = 0;
    for (u32 i = 0; i < TABLE_SIZE; i++)
        for (const struct entry *e = t->slots[i]; e; e = e->next)
            total += e->count * (long)str_len(e->key);
    return total;
}

static int is_letter(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static int count_words(const char *text)
{
    const char *p = text;
    while (*p) {
        while (*p && !is_letter(*p))
            p++;
        const char *start = p;
        while (is_letter(*p))
            p++;
        if (p > start && table_add(&words, start, (size_t)(p - start)) < 0)
            return -1;
    }
    return (int)words.len;
}

static u32 crc_table[256];

static void crc_init(void)
{
    for (u32 i = 0; i < 256; i++) {
        u32 c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static u32 crc32(const unsigned char *p, size_t n)
{
    u32 c = 0xffffffffu;
    for (size_t i = 0; i < n; i++)
        c = crc_table[(c ^ p[i]) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

static void swap_long(long *a, long *b)
{
    long t = *a;
    *a = *b;
    *b = t;
}

static void quicksort(long *v, long lo, long hi)
{
    if (lo >= hi)
        return;
    long pivot = v[lo + (hi - lo) / 2];
    long i = lo, j = hi;
    while (i <= j) {
        while (v[i] < pivot)
            i++;
        while (v[j] > pivot)
            j--;
        if (i <= j)
            swap_long(&v[i++], &v[j--]);
    }
    quicksort(v, lo, j);
    quicksort(v, i, hi);
}

struct matrix {
    double m[N][N];
};

static void mat_fill(struct matrix *a, double seed)
{
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++)
            a->m[i][j] = seed * (i + 1) - j * 0.5;
}

static void mat_mul(struct matrix *out, const struct matrix *a, const struct matrix *b)
{
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            double sum = 0.0;
            for (int k = 0; k < N; k++)
                sum += a->m[i][k] * b->m[k][j];
            out->m[i][j] = sum;
        }
}

static double mat_trace(const struct matrix *a)
{
    double t = 0.0;
    for (int i = 0; i < N; i++)
        t += a->m[i][i];
    return t;
}

struct parser {
    const char *p;
    int error;
};

static long parse_sum(struct parser *ps);

static void skip_spaces(struct parser *ps)
{
    while (*ps->p == ' ')
        ps->p++;
}

static long parse_factor(struct parser *ps)
{
    skip_spaces(ps);
    if (*ps->p == '-') {
        ps->p++;
        return -parse_factor(ps);
    }
    if (*ps->p == '(') {
        ps->p++;
        long v = parse_sum(ps);
        skip_spaces(ps);
        if (*ps->p == ')')
            ps->p++;
        else
            ps->error = 1;
        return v;
    }
    long v = 0;
    if (*ps->p < '0' || *ps->p > '9')
        ps->error = 1;
    while (*ps->p >= '0' && *ps->p <= '9')
        v = v * 10 + (*ps->p++ - '0');
    return v;
}

static long parse_product(struct parser *ps)
{
    long v = parse_factor(ps);
    for (;;) {
        skip_spaces(ps);
        char op = *ps->p;
        if (op != '*' && op != '/' && op != '%')
            return v;
        ps->p++;
        long rhs = parse_factor(ps);
        if (op == '*')
            v *= rhs;
        else if (rhs == 0)
            ps->error = 1;
        else if (op == '/')
            v /= rhs;
        else
            v %= rhs;
    }
}

static long parse_sum(struct parser *ps)
{
    long v = parse_product(ps);
    for (;;) {
        skip_spaces(ps);
        char op = *ps->p;
        if (op != '+' && op != '-')
            return v;
        ps->p++;
        long rhs = parse_product(ps);
        v = op == '+' ? v + rhs : v - rhs;
    }
}

static long eval(const char *expr, int *error)
{
    struct parser ps = { expr, 0 };
    long v = parse_sum(&ps);
    *error = ps.error || *ps.p != '\0';
    return v;
}

static u64 sieve[(SIEVE_LIMIT + 63) / 64];

static int count_primes(int limit)
{
    int count = 0;
    for (int i = 2; i < limit; i++) {
        if (sieve[i / 64] & (1ull << (i % 64)))
            continue;
        count++;
        for (int j = i * 2; j < limit; j += i)
            sieve[j / 64] |= 1ull << (j % 64);
    }
    return count;
}

static long fib(int n)
{
    return n < 2 ? n : fib(n - 1) + fib(n - 2);
}

static int collatz_steps(u64 n)
{
    int steps = 0;
    while (n != 1) {
        n = (n & 1) ? 3 * n + 1 : n / 2;
        steps++;
    }
    return steps;
}

static const char *const TEXT =
    "the quick brown fox jumps over the lazy dog while the lazy dog sleeps "
    "a snapshotter mounts the layer and the kernel pages in what the container reads "
    "the compiler parses the source builds its tree and runs the passes over it";

static const char *const EXPRESSIONS[] = {
    "1 + 2 * 3",
    "(4 + 5) * (6 - 7) % 11",
    "-(8 * 9) / 3 + 100",
    "((1 + 2) * (3 + 4) * (5 + 6)) - 77",
};

int main(void)
{
    long checksum = 0;
    crc_init();
    if (count_words(TEXT) < 0)
        return 1;
    checksum += table_weight(&words);
    checksum ^= crc32((const unsigned char *)TEXT, str_len(TEXT));

    long values[64];
    for (int i = 0; i < 64; i++)
        values[i] = (long)((i * 2654435761u) % 1000);
    quicksort(values, 0, 63);
    for (int i = 1; i < 64; i++)
        if (values[i - 1] > values[i])
            return 2;
    checksum += values[32];

    static struct matrix a, b, c;
    mat_fill(&a, 1.5);
    mat_fill(&b, -0.25);
    mat_mul(&c, &a, &b);
    checksum += (long)mat_trace(&c);

    for (size_t i = 0; i < sizeof EXPRESSIONS / sizeof EXPRESSIONS[0]; i++) {
        int error;
        long v = eval(EXPRESSIONS[i], &error);
        if (error)
            return 3;
        checksum = checksum * 31 + v;
    }

    checksum += count_primes(SIEVE_LIMIT);
    checksum += fib(20);
    for (u64 n = 1; n < 1000; n++)
        checksum += collatz_steps(n);
    return (int)(checksum & 0x7f);
}
