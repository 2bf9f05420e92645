//! espada-crypto: AES-GCM for ESP as RFC 4106 defines it, sealing and opening **in place**.
//!
//! * RFC 4106 §8.1: the keying material is the AES key (16 or 32 bytes) followed by a 4-byte salt.
//! * RFC 4106 §4: the 12-byte nonce is salt ‖ the 8-byte explicit IV carried in each packet.
//! * RFC 4106 §5: the AAD is SPI ‖ sequence number (8 bytes), or SPI ‖ seq-high ‖ seq-low
//!   (12 bytes) with extended sequence numbers.
//! * RFC 4106 §6: espada always uses a 16-byte ICV.
//!
//! One trait, [`EspAead`], and several backends that must give identical bytes on identical
//! inputs (the differential tests check this): [`RingGcm`] (default), [`RustCryptoGcm`] (pure
//! Rust, the `aes-gcm` crate) and, behind the `aws-lc` feature, [`AwsLcGcm`]. [`Cipher`] picks
//! one at run time by [`Backend`] without dynamic dispatch.
//!
//! Key hygiene: [`KeyMaterial`] is zeroized on drop and its `Debug` prints `<redacted>`. The
//! `aes-gcm` backend zeroizes its key schedule (crate feature `zeroize`). ring and aws-lc keep
//! their expanded keys in their own types, which do not zeroize: say so in any threat model.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use core::fmt;
use zeroize::{Zeroize, Zeroizing};

/// ICV length (RFC 4106 §6; espada uses 16 bytes only).
pub const TAG_LEN: usize = 16;
/// Explicit IV length (RFC 4106 §3.1).
pub const IV_LEN: usize = 8;
/// Salt length (RFC 4106 §4).
pub const SALT_LEN: usize = 4;

/// The two AEAD transforms espada supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// AES-128-GCM with a 16-byte ICV.
    AesGcm128,
    /// AES-256-GCM with a 16-byte ICV.
    AesGcm256,
}

impl Algorithm {
    /// AES key length in bytes.
    pub const fn key_len(self) -> usize {
        match self {
            Algorithm::AesGcm128 => 16,
            Algorithm::AesGcm256 => 32,
        }
    }
    /// Keying material length: key + salt (RFC 4106 §8.1).
    pub const fn key_material_len(self) -> usize {
        self.key_len() + SALT_LEN
    }
    /// Key length in bits.
    pub const fn key_bits(self) -> usize {
        self.key_len() * 8
    }
    /// Name used in configs and reports: `aes-gcm-128` / `aes-gcm-256`.
    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::AesGcm128 => "aes-gcm-128",
            Algorithm::AesGcm256 => "aes-gcm-256",
        }
    }
    /// Parses `aes-gcm-128` / `aes-gcm-256` (also `aes128gcm16`, `aes256gcm16` as strongSwan names them).
    pub fn from_name(s: &str) -> Option<Algorithm> {
        match s {
            "aes-gcm-128" | "aes128gcm16" => Some(Algorithm::AesGcm128),
            "aes-gcm-256" | "aes256gcm16" => Some(Algorithm::AesGcm256),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors building keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Wrong number of bytes for the algorithm.
    #[error("{alg} keying material must be {expected} bytes (key + 4-byte salt), got {got}")]
    Length {
        /// Algorithm asked for.
        alg: Algorithm,
        /// Bytes expected.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// Not hexadecimal.
    #[error("keying material is not valid hex (expected {expected} hex digits)")]
    Hex {
        /// Hex digits expected.
        expected: usize,
    },
    /// The backend refused the key.
    #[error("the {0} backend rejected the key")]
    Backend(&'static str),
}

/// RFC 4106 keying material: key ‖ salt. Zeroized on drop; `Debug` never prints it.
#[derive(Clone)]
pub struct KeyMaterial {
    alg: Algorithm,
    bytes: Zeroizing<[u8; 36]>,
}

impl KeyMaterial {
    /// Takes key ‖ salt bytes for `alg`.
    pub fn new(alg: Algorithm, key_and_salt: &[u8]) -> Result<Self, KeyError> {
        if key_and_salt.len() != alg.key_material_len() {
            return Err(KeyError::Length {
                alg,
                expected: alg.key_material_len(),
                got: key_and_salt.len(),
            });
        }
        let mut bytes = Zeroizing::new([0u8; 36]);
        bytes[..key_and_salt.len()].copy_from_slice(key_and_salt);
        Ok(KeyMaterial { alg, bytes })
    }

    /// Parses hex (an optional `0x` prefix is allowed). The error never contains the key.
    pub fn from_hex(alg: Algorithm, hex_str: &str) -> Result<Self, KeyError> {
        let s = hex_str.trim();
        let s = s.strip_prefix("0x").unwrap_or(s);
        let mut buf = Zeroizing::new(vec![0u8; s.len() / 2]);
        if !s.len().is_multiple_of(2) || hex::decode_to_slice(s, &mut buf[..]).is_err() {
            return Err(KeyError::Hex {
                expected: alg.key_material_len() * 2,
            });
        }
        Self::new(alg, &buf)
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
    /// The AES key.
    pub fn key(&self) -> &[u8] {
        &self.bytes[..self.alg.key_len()]
    }
    /// The 4-byte salt.
    pub fn salt(&self) -> [u8; SALT_LEN] {
        let k = self.alg.key_len();
        let mut s = [0u8; SALT_LEN];
        s.copy_from_slice(&self.bytes[k..k + SALT_LEN]);
        s
    }
    /// key ‖ salt, for exporting to another implementation's configuration (ip xfrm, tshark).
    /// Handle with care: this is the secret.
    pub fn expose_key_and_salt(&self) -> &[u8] {
        &self.bytes[..self.alg.key_material_len()]
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyMaterial({}, <redacted>)", self.alg)
    }
}

impl PartialEq for KeyMaterial {
    fn eq(&self, other: &Self) -> bool {
        // Not constant-time: only used by configuration code and tests, never on packets.
        self.alg == other.alg && self.expose_key_and_salt() == other.expose_key_and_salt()
    }
}
impl Eq for KeyMaterial {}

/// Authentication failed (or the buffer could not hold a tag): the packet must be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AeadError;

impl fmt::Display for AeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AEAD authentication failed")
    }
}
impl std::error::Error for AeadError {}

/// RFC 4106 AES-GCM in place, in the ESP layout: the tag sits right after the text.
pub trait EspAead: Send + Sync {
    /// Encrypts `buf[..len-16]` in place and writes the 16-byte ICV into `buf[len-16..]`.
    /// Fails only when `buf` is shorter than a tag.
    fn seal_in_place(&self, iv: &[u8; IV_LEN], aad: &[u8], buf: &mut [u8])
        -> Result<(), AeadError>;

    /// Verifies the ICV at `buf[len-16..]` and decrypts `buf[..len-16]` in place, returning the
    /// plaintext length. On failure the contents of `buf` are unspecified.
    fn open_in_place(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, AeadError>;

    /// The algorithm this key is for.
    fn algorithm(&self) -> Algorithm;
}

#[inline(always)]
fn nonce(salt: &[u8; SALT_LEN], iv: &[u8; IV_LEN]) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(salt);
    n[4..].copy_from_slice(iv);
    n
}

/// The `ring` backend (default: fastest portable choice measured on this CPU family).
pub struct RingGcm {
    key: ring::aead::LessSafeKey,
    salt: [u8; SALT_LEN],
    alg: Algorithm,
}

impl RingGcm {
    /// Builds the key schedule.
    pub fn new(km: &KeyMaterial) -> Result<Self, KeyError> {
        let a = match km.algorithm() {
            Algorithm::AesGcm128 => &ring::aead::AES_128_GCM,
            Algorithm::AesGcm256 => &ring::aead::AES_256_GCM,
        };
        let unbound =
            ring::aead::UnboundKey::new(a, km.key()).map_err(|_| KeyError::Backend("ring"))?;
        Ok(RingGcm {
            key: ring::aead::LessSafeKey::new(unbound),
            salt: km.salt(),
            alg: km.algorithm(),
        })
    }
}

impl EspAead for RingGcm {
    #[inline]
    fn seal_in_place(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<(), AeadError> {
        let Some(text_len) = buf.len().checked_sub(TAG_LEN) else {
            return Err(AeadError);
        };
        let (text, tag_out) = buf.split_at_mut(text_len);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce(&self.salt, iv)),
                ring::aead::Aad::from(aad),
                text,
            )
            .map_err(|_| AeadError)?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(())
    }

    #[inline]
    fn open_in_place(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, AeadError> {
        if buf.len() < TAG_LEN {
            return Err(AeadError);
        }
        self.key
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(nonce(&self.salt, iv)),
                ring::aead::Aad::from(aad),
                buf,
            )
            .map(|pt| pt.len())
            .map_err(|_| AeadError)
    }

    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

enum RustCryptoKey {
    A128(Box<aes_gcm::Aes128Gcm>),
    A256(Box<aes_gcm::Aes256Gcm>),
}

/// The pure-Rust backend (`aes-gcm` crate, RustCrypto). Portable and zeroizing; slower than
/// ring unless built with `-C target-cpu=native`.
pub struct RustCryptoGcm {
    key: RustCryptoKey,
    salt: [u8; SALT_LEN],
}

impl RustCryptoGcm {
    /// Builds the key schedule.
    pub fn new(km: &KeyMaterial) -> Result<Self, KeyError> {
        use aes_gcm::KeyInit;
        let key = match km.algorithm() {
            Algorithm::AesGcm128 => RustCryptoKey::A128(Box::new(
                aes_gcm::Aes128Gcm::new_from_slice(km.key())
                    .map_err(|_| KeyError::Backend("aes-gcm"))?,
            )),
            Algorithm::AesGcm256 => RustCryptoKey::A256(Box::new(
                aes_gcm::Aes256Gcm::new_from_slice(km.key())
                    .map_err(|_| KeyError::Backend("aes-gcm"))?,
            )),
        };
        Ok(RustCryptoGcm {
            key,
            salt: km.salt(),
        })
    }
}

impl EspAead for RustCryptoGcm {
    #[inline]
    fn seal_in_place(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<(), AeadError> {
        use aes_gcm::AeadInOut;
        let Some(text_len) = buf.len().checked_sub(TAG_LEN) else {
            return Err(AeadError);
        };
        let n = nonce(&self.salt, iv);
        let n = aes_gcm::Nonce::from(n);
        let (text, tag_out) = buf.split_at_mut(text_len);
        let tag = match &self.key {
            RustCryptoKey::A128(k) => k.encrypt_inout_detached(&n, aad, text.into()),
            RustCryptoKey::A256(k) => k.encrypt_inout_detached(&n, aad, text.into()),
        }
        .map_err(|_| AeadError)?;
        tag_out.copy_from_slice(&tag);
        Ok(())
    }

    #[inline]
    fn open_in_place(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, AeadError> {
        use aes_gcm::AeadInOut;
        let Some(text_len) = buf.len().checked_sub(TAG_LEN) else {
            return Err(AeadError);
        };
        let n = aes_gcm::Nonce::from(nonce(&self.salt, iv));
        let (text, tag) = buf.split_at_mut(text_len);
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag);
        let t = aes_gcm::Tag::from(t);
        match &self.key {
            RustCryptoKey::A128(k) => k.decrypt_inout_detached(&n, aad, text.into(), &t),
            RustCryptoKey::A256(k) => k.decrypt_inout_detached(&n, aad, text.into(), &t),
        }
        .map_err(|_| AeadError)?;
        Ok(text_len)
    }

    fn algorithm(&self) -> Algorithm {
        match self.key {
            RustCryptoKey::A128(_) => Algorithm::AesGcm128,
            RustCryptoKey::A256(_) => Algorithm::AesGcm256,
        }
    }
}

/// The aws-lc-rs backend (feature `aws-lc`).
#[cfg(feature = "aws-lc")]
pub struct AwsLcGcm {
    key: aws_lc_rs::aead::LessSafeKey,
    salt: [u8; SALT_LEN],
    alg: Algorithm,
}

#[cfg(feature = "aws-lc")]
impl AwsLcGcm {
    /// Builds the key schedule.
    pub fn new(km: &KeyMaterial) -> Result<Self, KeyError> {
        let a = match km.algorithm() {
            Algorithm::AesGcm128 => &aws_lc_rs::aead::AES_128_GCM,
            Algorithm::AesGcm256 => &aws_lc_rs::aead::AES_256_GCM,
        };
        let unbound = aws_lc_rs::aead::UnboundKey::new(a, km.key())
            .map_err(|_| KeyError::Backend("aws-lc"))?;
        Ok(AwsLcGcm {
            key: aws_lc_rs::aead::LessSafeKey::new(unbound),
            salt: km.salt(),
            alg: km.algorithm(),
        })
    }
}

#[cfg(feature = "aws-lc")]
impl EspAead for AwsLcGcm {
    #[inline]
    fn seal_in_place(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<(), AeadError> {
        let Some(text_len) = buf.len().checked_sub(TAG_LEN) else {
            return Err(AeadError);
        };
        let (text, tag_out) = buf.split_at_mut(text_len);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce(&self.salt, iv)),
                aws_lc_rs::aead::Aad::from(aad),
                text,
            )
            .map_err(|_| AeadError)?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(())
    }

    #[inline]
    fn open_in_place(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, AeadError> {
        if buf.len() < TAG_LEN {
            return Err(AeadError);
        }
        self.key
            .open_in_place(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce(&self.salt, iv)),
                aws_lc_rs::aead::Aad::from(aad),
                buf,
            )
            .map(|pt| pt.len())
            .map_err(|_| AeadError)
    }

    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// The intel-ipsec-mb backend (feature `ipsec-mb`): the library behind DPDK's aesni_gcm
/// device, using the CPU's VAES/AVX-512 code paths where present.
#[cfg(feature = "ipsec-mb")]
pub struct IpsecMbGcm {
    key: ipsec_mb_sys::GcmKey,
    salt: [u8; SALT_LEN],
    alg: Algorithm,
}

#[cfg(feature = "ipsec-mb")]
impl IpsecMbGcm {
    /// Expands the key and precomputes the GHASH table (the manager is the process's, shared by every key).
    pub fn new(km: &KeyMaterial) -> Result<Self, KeyError> {
        let key = ipsec_mb_sys::GcmKey::new(km.key()).map_err(|_| KeyError::Backend("ipsec-mb"))?;
        Ok(IpsecMbGcm {
            key,
            salt: km.salt(),
            alg: km.algorithm(),
        })
    }

    /// The code path the library picked on this CPU.
    pub fn arch(&self) -> &'static str {
        self.key.arch()
    }
}

#[cfg(feature = "ipsec-mb")]
impl EspAead for IpsecMbGcm {
    #[inline]
    fn seal_in_place(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<(), AeadError> {
        let Some(text_len) = buf.len().checked_sub(TAG_LEN) else {
            return Err(AeadError);
        };
        let (text, tag_out) = buf.split_at_mut(text_len);
        let mut tag = [0u8; TAG_LEN];
        self.key.seal(&nonce(&self.salt, iv), aad, text, &mut tag);
        tag_out.copy_from_slice(&tag);
        Ok(())
    }

    #[inline]
    fn open_in_place(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, AeadError> {
        let Some(text_len) = buf.len().checked_sub(TAG_LEN) else {
            return Err(AeadError);
        };
        let (text, tag_in) = buf.split_at_mut(text_len);
        let mut tag = [0u8; TAG_LEN];
        self.key.open(&nonce(&self.salt, iv), aad, text, &mut tag);
        // Constant-time comparison of the computed and received ICV: one XOR of the two
        // 128-bit values, no early exit.
        let Ok(tag_in) = <&[u8; TAG_LEN]>::try_from(&*tag_in) else {
            return Err(AeadError);
        };
        let diff = u128::from_ne_bytes(tag) ^ u128::from_ne_bytes(*tag_in);
        if std::hint::black_box(diff) != 0 {
            return Err(AeadError);
        }
        Ok(text_len)
    }

    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// Below this many bytes of ESP text (payload, padding, trailer) the hybrid backend seals and
/// opens with intel-ipsec-mb, from it on with ring. Where measured (AMD EPYC with VAES and
/// VPCLMULQDQ but no AVX-512; ipsec-mb 1.3 runs its AVX2 code there, ring 0.17 its VAES-AVX2
/// code), per seal: 68 B ipsec-mb 82 ns / ring 137 ns; 644 B 192 / 199; 772 B 220 / 214;
/// 1028 B 279 / 251; 1404 B 360 / 299 (opens alike). The crossover is about 700 bytes.
#[cfg(feature = "ipsec-mb")]
pub const HYBRID_RING_FROM: usize = 704;

/// intel-ipsec-mb for short packets, ring for long ones (feature `ipsec-mb`). On CPUs with
/// VAES/VPCLMULQDQ but no AVX-512, ring's VAES-AVX2 GCM is ~20 % faster than ipsec-mb's AVX2
/// path at 1400 bytes, while ipsec-mb's lower fixed cost wins below ~700 bytes: this backend
/// takes the faster one per packet. Both compute the same AES-GCM, so the output does not
/// depend on which one ran (`backends_agree`). It holds two key schedules (the ring one
/// on the heap: ~580 bytes more per SA than either alone), which is why `auto` takes it only
/// when it measures fastest and the gateway is not a many-tunnel concentrator
/// ([`Backend::choose`]).
#[cfg(feature = "ipsec-mb")]
pub struct HybridGcm {
    small: IpsecMbGcm,
    large: Box<RingGcm>,
}

#[cfg(feature = "ipsec-mb")]
impl HybridGcm {
    /// Builds both key schedules.
    pub fn new(km: &KeyMaterial) -> Result<Self, KeyError> {
        Ok(HybridGcm {
            small: IpsecMbGcm::new(km)?,
            large: Box::new(RingGcm::new(km)?),
        })
    }
}

#[cfg(feature = "ipsec-mb")]
impl EspAead for HybridGcm {
    #[inline]
    fn seal_in_place(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<(), AeadError> {
        if buf.len() >= HYBRID_RING_FROM + TAG_LEN {
            self.large.seal_in_place(iv, aad, buf)
        } else {
            self.small.seal_in_place(iv, aad, buf)
        }
    }

    #[inline]
    fn open_in_place(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, AeadError> {
        if buf.len() >= HYBRID_RING_FROM + TAG_LEN {
            self.large.open_in_place(iv, aad, buf)
        } else {
            self.small.open_in_place(iv, aad, buf)
        }
    }

    fn algorithm(&self) -> Algorithm {
        self.small.algorithm()
    }
}

/// Which implementation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// ring (default).
    #[default]
    Ring,
    /// RustCrypto `aes-gcm`.
    RustCrypto,
    /// aws-lc-rs (only with the `aws-lc` feature).
    AwsLc,
    /// intel-ipsec-mb (only with the `ipsec-mb` feature).
    IpsecMb,
    /// intel-ipsec-mb below [`HYBRID_RING_FROM`] bytes, ring from it on (only with the
    /// `ipsec-mb` feature).
    Hybrid,
}

impl Backend {
    /// Every backend compiled into this build.
    pub fn available() -> &'static [Backend] {
        const ALL: &[Backend] = &[
            Backend::Ring,
            Backend::RustCrypto,
            #[cfg(feature = "aws-lc")]
            Backend::AwsLc,
            #[cfg(feature = "ipsec-mb")]
            Backend::IpsecMb,
            #[cfg(feature = "ipsec-mb")]
            Backend::Hybrid,
        ];
        ALL
    }

    /// Measures every available backend sealing `size`-byte ESP payloads for about `budget`
    /// each, and returns the fastest with every figure (ns per seal). Control path only.
    pub fn fastest(
        alg: Algorithm,
        size: usize,
        budget: std::time::Duration,
    ) -> (Backend, Vec<(Backend, f64)>) {
        let (b, figs) = Backend::fastest_over(alg, &[size], budget, &[]);
        (b, figs.into_iter().map(|(b, ns)| (b, ns[0])).collect())
    }

    /// Measures every available backend but `skip` sealing ESP payloads of each size in
    /// `sizes` (about `budget` per backend and size) and returns the one with the lowest sum
    /// over the sizes of its time ÷ the best time at that size: the backend that is fastest
    /// across the sizes, none of them weighing more for being longer. Also returns the
    /// figures (ns per seal, one per size). Control path only.
    pub fn fastest_over(
        alg: Algorithm,
        sizes: &[usize],
        budget: std::time::Duration,
        skip: &[Backend],
    ) -> (Backend, Vec<(Backend, Vec<f64>)>) {
        let km =
            KeyMaterial::new(alg, &[0x5au8; 36][..alg.key_material_len()]).expect("length matches");
        let mut figs: Vec<(Backend, Vec<f64>)> = Vec::new();
        for b in Backend::available().iter().filter(|b| !skip.contains(b)) {
            let Ok(c) = Cipher::new(*b, &km) else {
                continue;
            };
            let mut per_size = Vec::with_capacity(sizes.len());
            for &size in sizes {
                let mut buf = vec![0u8; size + TAG_LEN];
                for i in 0..64u64 {
                    let _ = c.seal_in_place(&i.to_be_bytes(), &[0; 12], &mut buf);
                }
                let t = std::time::Instant::now();
                let mut n = 0u64;
                while t.elapsed() < budget {
                    for _ in 0..64 {
                        let _ = c.seal_in_place(&n.to_be_bytes(), &[0; 12], &mut buf);
                        n += 1;
                    }
                }
                per_size.push(t.elapsed().as_nanos() as f64 / n as f64);
            }
            figs.push((*b, per_size));
        }
        let best_at: Vec<f64> = (0..sizes.len())
            .map(|i| figs.iter().map(|f| f.1[i]).fold(f64::INFINITY, f64::min))
            .collect();
        let score = |f: &[f64]| -> f64 { f.iter().zip(&best_at).map(|(ns, b)| ns / b).sum() };
        let best = figs
            .iter()
            .min_by(|a, b| score(&a.1).total_cmp(&score(&b.1)))
            .map(|x| x.0)
            .unwrap_or(Backend::Ring);
        (best, figs)
    }

    /// Whether a key of this backend holds more than one key schedule (memory per SA).
    pub const fn two_schedules(self) -> bool {
        matches!(self, Backend::Hybrid)
    }

    /// Name for configs and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Ring => "ring",
            Backend::RustCrypto => "aes-gcm",
            Backend::AwsLc => "aws-lc",
            Backend::IpsecMb => "ipsec-mb",
            Backend::Hybrid => "ipsec-mb+ring",
        }
    }
    /// Parses a name.
    pub fn from_name(s: &str) -> Option<Backend> {
        match s {
            "ring" => Some(Backend::Ring),
            "aes-gcm" | "rustcrypto" => Some(Backend::RustCrypto),
            "aws-lc" | "aws-lc-rs" => Some(Backend::AwsLc),
            "ipsec-mb" | "intel-ipsec-mb" => Some(Backend::IpsecMb),
            "ipsec-mb+ring" | "hybrid" => Some(Backend::Hybrid),
            _ => None,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A key bound to a backend chosen at run time (enum dispatch: no vtable on the fast path).
/// The ring key schedule is kept inline on purpose: it sits in the SA's cache lines, not
/// behind another pointer.
#[allow(clippy::large_enum_variant)]
pub enum Cipher {
    /// ring.
    Ring(RingGcm),
    /// aes-gcm.
    RustCrypto(RustCryptoGcm),
    /// aws-lc-rs.
    #[cfg(feature = "aws-lc")]
    AwsLc(AwsLcGcm),
    /// intel-ipsec-mb.
    #[cfg(feature = "ipsec-mb")]
    IpsecMb(IpsecMbGcm),
    /// intel-ipsec-mb for short packets, ring for long ones.
    #[cfg(feature = "ipsec-mb")]
    Hybrid(HybridGcm),
}

impl Cipher {
    /// Builds the key schedule for `backend`. `Backend::AwsLc` without the feature is an error.
    pub fn new(backend: Backend, km: &KeyMaterial) -> Result<Cipher, KeyError> {
        Ok(match backend {
            Backend::Ring => Cipher::Ring(RingGcm::new(km)?),
            Backend::RustCrypto => Cipher::RustCrypto(RustCryptoGcm::new(km)?),
            #[cfg(feature = "aws-lc")]
            Backend::AwsLc => Cipher::AwsLc(AwsLcGcm::new(km)?),
            #[cfg(not(feature = "aws-lc"))]
            Backend::AwsLc => return Err(KeyError::Backend("aws-lc (not built: feature aws-lc)")),
            #[cfg(feature = "ipsec-mb")]
            Backend::IpsecMb => Cipher::IpsecMb(IpsecMbGcm::new(km)?),
            #[cfg(not(feature = "ipsec-mb"))]
            Backend::IpsecMb => {
                return Err(KeyError::Backend("ipsec-mb (not built: feature ipsec-mb)"))
            }
            #[cfg(feature = "ipsec-mb")]
            Backend::Hybrid => Cipher::Hybrid(HybridGcm::new(km)?),
            #[cfg(not(feature = "ipsec-mb"))]
            Backend::Hybrid => {
                return Err(KeyError::Backend(
                    "ipsec-mb+ring (not built: feature ipsec-mb)",
                ))
            }
        })
    }

    /// Where the key schedule lives and its size, for a burst loop to prefetch before it
    /// seals or opens (the backends that keep it inline: this value itself).
    #[inline(always)]
    pub fn schedule(&self) -> (*const u8, usize) {
        match self {
            #[cfg(feature = "ipsec-mb")]
            Cipher::IpsecMb(c) => c.key.schedule(),
            // The short-packet key: a long packet's crypto outlasts one miss on the ring key.
            #[cfg(feature = "ipsec-mb")]
            Cipher::Hybrid(c) => c.small.key.schedule(),
            _ => (
                self as *const Cipher as *const u8,
                std::mem::size_of::<Cipher>(),
            ),
        }
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        match self {
            Cipher::Ring(_) => Backend::Ring,
            Cipher::RustCrypto(_) => Backend::RustCrypto,
            #[cfg(feature = "aws-lc")]
            Cipher::AwsLc(_) => Backend::AwsLc,
            #[cfg(feature = "ipsec-mb")]
            Cipher::IpsecMb(_) => Backend::IpsecMb,
            #[cfg(feature = "ipsec-mb")]
            Cipher::Hybrid(_) => Backend::Hybrid,
        }
    }
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Cipher({}, {}, <key redacted>)",
            self.backend(),
            self.algorithm()
        )
    }
}

impl EspAead for Cipher {
    #[inline(always)]
    fn seal_in_place(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<(), AeadError> {
        match self {
            Cipher::Ring(c) => c.seal_in_place(iv, aad, buf),
            Cipher::RustCrypto(c) => c.seal_in_place(iv, aad, buf),
            #[cfg(feature = "aws-lc")]
            Cipher::AwsLc(c) => c.seal_in_place(iv, aad, buf),
            #[cfg(feature = "ipsec-mb")]
            Cipher::IpsecMb(c) => c.seal_in_place(iv, aad, buf),
            #[cfg(feature = "ipsec-mb")]
            Cipher::Hybrid(c) => c.seal_in_place(iv, aad, buf),
        }
    }

    #[inline(always)]
    fn open_in_place(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, AeadError> {
        match self {
            Cipher::Ring(c) => c.open_in_place(iv, aad, buf),
            Cipher::RustCrypto(c) => c.open_in_place(iv, aad, buf),
            #[cfg(feature = "aws-lc")]
            Cipher::AwsLc(c) => c.open_in_place(iv, aad, buf),
            #[cfg(feature = "ipsec-mb")]
            Cipher::IpsecMb(c) => c.open_in_place(iv, aad, buf),
            #[cfg(feature = "ipsec-mb")]
            Cipher::Hybrid(c) => c.open_in_place(iv, aad, buf),
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            Cipher::Ring(c) => c.algorithm(),
            Cipher::RustCrypto(c) => c.algorithm(),
            #[cfg(feature = "aws-lc")]
            Cipher::AwsLc(c) => c.algorithm(),
            #[cfg(feature = "ipsec-mb")]
            Cipher::IpsecMb(c) => c.algorithm(),
            #[cfg(feature = "ipsec-mb")]
            Cipher::Hybrid(c) => c.algorithm(),
        }
    }
}

struct HkdfLen(usize);

impl ring::hkdf::KeyType for HkdfLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// Derives keying material for `alg` from a lab secret with HKDF-SHA256 (RFC 5869):
/// salt `espada-lab-v1`, info = `context` (espada uses `tunnel-name|spi`), so two gateways
/// configured with the same secret agree on every SA's key without copying keys around.
/// For labs and demos; production keys come from IKE or a key file.
pub fn derive_lab_key(alg: Algorithm, secret: &[u8], context: &str) -> KeyMaterial {
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"espada-lab-v1").extract(secret);
    let info = [context.as_bytes()];
    let mut out = Zeroizing::new([0u8; 36]);
    let n = alg.key_material_len();
    prk.expand(&info, HkdfLen(n))
        .and_then(|okm| okm.fill(&mut out[..n]))
        .expect("HKDF-SHA256 can produce 36 bytes");
    KeyMaterial::new(alg, &out[..n]).expect("length matches the algorithm")
}

/// Wipes a scratch buffer that held key bytes.
pub fn wipe(buf: &mut [u8]) {
    buf.zeroize();
}

#[cfg(test)]
mod tests;
