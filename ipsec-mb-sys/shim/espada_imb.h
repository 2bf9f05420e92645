/* espada's shim over intel-ipsec-mb: the library's AES-GCM API is macros over the manager's
 * function table (IMB_AES128_GCM_ENC and friends), which bindgen cannot bind. These plain
 * functions can be. */
#ifndef ESPADA_IMB_H
#define ESPADA_IMB_H
#include <stddef.h>
#include <stdint.h>

typedef struct espada_imb espada_imb;

/* A manager (alloc_mb_mgr + init_mb_mgr_auto). NULL on failure. */
espada_imb *espada_imb_new(void);
void espada_imb_free(espada_imb *m);
/* Name of the code path the library chose ("AVX512", "AVX2", "SSE", ...). */
const char *espada_imb_arch(const espada_imb *m);
/* The library's version string. */
const char *espada_imb_version(void);
/* Size and alignment of the expanded key + GHASH table (struct gcm_key_data). */
size_t espada_imb_key_size(void);
size_t espada_imb_key_align(void);
/* Key schedule and GHASH precomputation. bits = 128 or 256. Returns 0 on success. */
int espada_imb_gcm_pre(const espada_imb *m, int bits, const uint8_t *key, void *key_data);
/* One-shot AES-GCM with a 12-byte IV, in place (dst may equal src), 16-byte tag. */
void espada_imb_gcm_enc(const espada_imb *m, int bits, const void *key_data, uint8_t *buf, uint64_t len,
                        const uint8_t *iv12, const uint8_t *aad, uint64_t aad_len, uint8_t *tag16);
void espada_imb_gcm_dec(const espada_imb *m, int bits, const void *key_data, uint8_t *buf, uint64_t len,
                        const uint8_t *iv12, const uint8_t *aad, uint64_t aad_len, uint8_t *tag16);
#endif
