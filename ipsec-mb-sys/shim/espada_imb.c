#include "espada_imb.h"
#include <intel-ipsec-mb.h>

struct espada_imb { IMB_MGR *mgr; };

espada_imb *espada_imb_new(void) {
    IMB_MGR *mgr = alloc_mb_mgr(0);
    if (mgr == NULL)
        return NULL;
    init_mb_mgr_auto(mgr, NULL);
    if (imb_get_errno(mgr) != 0) {
        free_mb_mgr(mgr);
        return NULL;
    }
    espada_imb *m = (espada_imb *)mgr; /* the manager itself is the handle */
    return m;
}

void espada_imb_free(espada_imb *m) { free_mb_mgr((IMB_MGR *)m); }

const char *espada_imb_arch(const espada_imb *m) {
    switch (((const IMB_MGR *)m)->used_arch) {
    case IMB_ARCH_NOAESNI: return "no-aesni";
    case IMB_ARCH_SSE: return "SSE";
    case IMB_ARCH_AVX: return "AVX";
    case IMB_ARCH_AVX2: return "AVX2";
    case IMB_ARCH_AVX512: return "AVX512";
    default: return "unknown";
    }
}

const char *espada_imb_version(void) { return imb_get_version_str(); }

size_t espada_imb_key_size(void) { return sizeof(struct gcm_key_data); }
size_t espada_imb_key_align(void) { return 64; }

int espada_imb_gcm_pre(const espada_imb *m, int bits, const uint8_t *key, void *kd) {
    IMB_MGR *mgr = (IMB_MGR *)m;
    if (bits == 128)
        IMB_AES128_GCM_PRE(mgr, key, (struct gcm_key_data *)kd);
    else if (bits == 256)
        IMB_AES256_GCM_PRE(mgr, key, (struct gcm_key_data *)kd);
    else
        return -1;
    return imb_get_errno(mgr);
}

void espada_imb_gcm_enc(const espada_imb *m, int bits, const void *kd, uint8_t *buf, uint64_t len,
                        const uint8_t *iv12, const uint8_t *aad, uint64_t aad_len, uint8_t *tag16) {
    IMB_MGR *mgr = (IMB_MGR *)m;
    struct gcm_context_data ctx;
    if (bits == 128)
        IMB_AES128_GCM_ENC(mgr, (const struct gcm_key_data *)kd, &ctx, buf, buf, len, iv12, aad, aad_len, tag16, 16);
    else
        IMB_AES256_GCM_ENC(mgr, (const struct gcm_key_data *)kd, &ctx, buf, buf, len, iv12, aad, aad_len, tag16, 16);
}

void espada_imb_gcm_dec(const espada_imb *m, int bits, const void *kd, uint8_t *buf, uint64_t len,
                        const uint8_t *iv12, const uint8_t *aad, uint64_t aad_len, uint8_t *tag16) {
    IMB_MGR *mgr = (IMB_MGR *)m;
    struct gcm_context_data ctx;
    if (bits == 128)
        IMB_AES128_GCM_DEC(mgr, (const struct gcm_key_data *)kd, &ctx, buf, buf, len, iv12, aad, aad_len, tag16, 16);
    else
        IMB_AES256_GCM_DEC(mgr, (const struct gcm_key_data *)kd, &ctx, buf, buf, len, iv12, aad, aad_len, tag16, 16);
}
