//! ipsec-mb-sys: the system's intel-ipsec-mb (the library behind DPDK's `crypto_aesni_gcm`),
//! reached through a small C shim (the library's GCM API is macros over a function table) whose
//! bindings bindgen generates at build time.
//!
//! [`GcmKey`] is the safe face: an expanded key and GHASH table, and one-shot in-place
//! seal/open through **one manager for the whole process** (allocated and initialised once,
//! on first use). The GCM direct API only reads the manager's function table (the pointers to
//! the code path picked for this CPU), so every thread and key shares it: no manager per key
//! (tens of kilobytes each, per SA and core) and no per-thread set-up. All `unsafe` of this
//! crate is here.

#[allow(non_camel_case_types, dead_code, missing_docs)]
mod ffi {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

use std::ffi::CStr;

/// Why a key could not be set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The manager could not be allocated or initialised (no AES-NI?).
    Manager,
    /// The key length is not 16 or 32 bytes.
    KeyLength,
}

/// The process's manager: initialised once, then only read (its function table).
struct Manager(*mut ffi::espada_imb);

// SAFETY: after `init_mb_mgr_auto` the GCM macros only read the manager's function table;
// nothing writes it again until the process ends (it is never freed).
unsafe impl Send for Manager {}
// SAFETY: as above.
unsafe impl Sync for Manager {}

static MANAGER: std::sync::OnceLock<Option<Manager>> = std::sync::OnceLock::new();

fn manager() -> Option<*mut ffi::espada_imb> {
    MANAGER
        .get_or_init(|| {
            // SAFETY: plain constructor call; NULL is checked.
            let m = unsafe { ffi::espada_imb_new() };
            (!m.is_null()).then_some(Manager(m))
        })
        .as_ref()
        .map(|m| m.0)
}

/// The library's whole key data, 64-byte aligned (its assembly reads it with aligned vector
/// loads).
#[repr(C, align(64))]
struct FullKey(ffi::gcm_key_data);

/// Bytes of key data a key holds inline: the 368 the AVX2 code path writes (round keys and 8
/// GHASH powers), rounded up to a 64-byte multiple.
const INLINE: usize = 384;

/// The first [`INLINE`] bytes of the key data, 16-byte aligned. The AVX2 GCM code of the
/// library reads key data only with VEX loads and operands that take any alignment (checked on
/// 1.3: no aligned move through a register in `aes_gcm_{pre,enc,dec}_{128,256}_avx_gen4`), and
/// 16 bytes also satisfy SSE's aligned operands. With 16 rather than 64, a key no longer
/// starts a cache line of its own: the SA's fields, the cipher's tag and the key share lines
/// (9 lines a packet read of an `OutboundSa`'s cipher become 7). Only the AVX2 path keeps its
/// key inline ([`GcmKey::new`]); every other path gets the whole struct, 64-byte aligned.
#[repr(C, align(16))]
struct InlineKey([u8; INLINE]);

/// How many bytes of `struct gcm_key_data` the library's precomputation writes on this CPU
/// (its code path is chosen once per process): measured once, by precomputing 128- and
/// 256-bit keys into two copies of the struct filled with different bytes; a byte it writes
/// is equal in both. The library reads only what its precomputation wrote (anything else
/// would make its results depend on memory it never initialised), so a key whose inline
/// part holds every written byte is complete.
fn written_extent(mgr: *mut ffi::espada_imb) -> usize {
    static EXTENT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *EXTENT.get_or_init(|| {
        let size = std::mem::size_of::<ffi::gcm_key_data>();
        let mut extent = 0;
        for bits in [128, 256] {
            let mut a = Box::new([0u8; 2048]);
            let mut b = Box::new([0xffu8; 2048]);
            for buf in [&mut a, &mut b] {
                // 64-byte aligned start inside the 2 KiB buffer (room for the struct).
                let off = buf.as_ptr().align_offset(64);
                // SAFETY: buf[off..off + size] is inside the buffer and aligned as the
                // library wants; the key is 32 readable bytes; mgr is initialised.
                unsafe {
                    ffi::espada_imb_gcm_pre(
                        mgr,
                        bits,
                        [0x5au8; 32].as_ptr(),
                        buf.as_mut_ptr().add(off).cast(),
                    );
                }
            }
            let (oa, ob) = (a.as_ptr().align_offset(64), b.as_ptr().align_offset(64));
            if let Some(last) = (0..size).rev().find(|&i| a[oa + i] == b[ob + i]) {
                extent = extent.max(last + 1);
            }
        }
        extent
    })
}

/// An AES-GCM key for intel-ipsec-mb (the manager is the process's, see the crate docs).
///
/// The key data is held inline when this CPU runs the AVX2 code path and it writes no more
/// than [`INLINE`] bytes of `struct gcm_key_data` (round keys and 8 GHASH powers, 368 bytes),
/// else in a 64-byte aligned block of the struct's whole size (SSE/AVX: 496 bytes; AVX512:
/// 368, kept whole because its loads were not checked for alignment; VAES-AVX512 keeps 48
/// powers: 1008). With thousands of SAs, a key of its own allocation was
/// one more cache line and page to miss per packet, and a kilobyte more per SA.
#[repr(C)]
pub struct GcmKey {
    inline: InlineKey,
    /// The whole struct, where the inline part is too small on this CPU.
    full: Option<Box<FullKey>>,
    mgr: *mut ffi::espada_imb,
    bits: i32,
}

// SAFETY: the manager's GCM functions are reentrant (they use only the caller's key and
// context, allocated per call on the stack); the key data is read-only after `new`.
unsafe impl Send for GcmKey {}
// SAFETY: as above: no method mutates shared state.
unsafe impl Sync for GcmKey {}

impl GcmKey {
    /// Expands `key` (16 or 32 bytes).
    pub fn new(key: &[u8]) -> Result<GcmKey, Error> {
        let bits = match key.len() {
            16 => 128,
            32 => 256,
            _ => return Err(Error::KeyLength),
        };
        let mgr = manager().ok_or(Error::Manager)?;
        // SAFETY: a pure function returning a constant: the size the shim was compiled with
        // must be the one bindgen read from the same header.
        if unsafe { ffi::espada_imb_key_size() } != std::mem::size_of::<ffi::gcm_key_data>() {
            return Err(Error::Manager);
        }
        // SAFETY: returns a pointer to a static string.
        let arch = unsafe { CStr::from_ptr(ffi::espada_imb_arch(mgr)) };
        let inline = arch.to_bytes() == b"AVX2" && written_extent(mgr) <= INLINE;
        let full = (!inline).then(|| {
            // SAFETY: gcm_key_data is plain bytes; all zeroes is a valid (empty) value.
            Box::new(FullKey(unsafe { std::mem::zeroed() }))
        });
        let mut k = GcmKey {
            inline: InlineKey([0; INLINE]),
            full,
            mgr,
            bits,
        };
        // SAFETY: key points to `key.len()` readable bytes; the store is zeroed, aligned and
        // holds every byte the precomputation writes on this CPU (`written_extent`); mgr is
        // initialised. The data holds no pointer into itself, so the key may move afterwards.
        let r = unsafe { ffi::espada_imb_gcm_pre(mgr, bits, key.as_ptr(), k.key_mut().0.cast()) };
        if r != 0 {
            return Err(Error::Manager);
        }
        Ok(k)
    }

    /// Where the expanded key and GHASH table live and their size (for a prefetch: reading
    /// through the pointer is for the library only).
    pub fn schedule(&self) -> (*const u8, usize) {
        match &self.full {
            // The key data and the fields after it (read on every call).
            None => (
                &self.inline as *const InlineKey as *const u8,
                std::mem::size_of::<GcmKey>(),
            ),
            Some(k) => (
                &**k as *const FullKey as *const u8,
                std::mem::size_of::<ffi::gcm_key_data>(),
            ),
        }
    }

    /// Whether the key data is held inline (reports, tests).
    pub fn inline(&self) -> bool {
        self.full.is_none()
    }

    #[inline(always)]
    fn key_ptr(&self) -> *const std::ffi::c_void {
        match &self.full {
            None => &self.inline as *const InlineKey as *const std::ffi::c_void,
            Some(k) => &**k as *const FullKey as *const std::ffi::c_void,
        }
    }

    fn key_mut(&mut self) -> (*mut u8, usize) {
        match &mut self.full {
            None => (&mut self.inline as *mut InlineKey as *mut u8, INLINE),
            Some(k) => (
                &mut **k as *mut FullKey as *mut u8,
                std::mem::size_of::<ffi::gcm_key_data>(),
            ),
        }
    }

    /// The code path the library chose (AVX512, AVX2, SSE...).
    pub fn arch(&self) -> &'static str {
        // SAFETY: returns a pointer to a static string.
        unsafe { CStr::from_ptr(ffi::espada_imb_arch(self.mgr)) }
            .to_str()
            .unwrap_or("?")
    }

    /// The library version.
    pub fn version() -> &'static str {
        // SAFETY: returns a pointer to a static string.
        unsafe { CStr::from_ptr(ffi::espada_imb_version()) }
            .to_str()
            .unwrap_or("?")
    }

    /// Encrypts `buf` in place and writes the 16-byte tag.
    #[inline]
    pub fn seal(&self, iv12: &[u8; 12], aad: &[u8], buf: &mut [u8], tag: &mut [u8; 16]) {
        // SAFETY: every pointer is valid for the length passed; buf is both source and
        // destination, which the library supports.
        unsafe {
            ffi::espada_imb_gcm_enc(
                self.mgr,
                self.bits,
                self.key_ptr(),
                buf.as_mut_ptr(),
                buf.len() as u64,
                iv12.as_ptr(),
                aad.as_ptr(),
                aad.len() as u64,
                tag.as_mut_ptr(),
            )
        }
    }

    /// Decrypts `buf` in place and writes the tag it computed (the caller compares).
    #[inline]
    pub fn open(&self, iv12: &[u8; 12], aad: &[u8], buf: &mut [u8], tag: &mut [u8; 16]) {
        // SAFETY: as `seal`.
        unsafe {
            ffi::espada_imb_gcm_dec(
                self.mgr,
                self.bits,
                self.key_ptr(),
                buf.as_mut_ptr(),
                buf.len() as u64,
                iv12.as_ptr(),
                aad.as_ptr(),
                aad.len() as u64,
                tag.as_mut_ptr(),
            )
        }
    }
}

impl Drop for GcmKey {
    fn drop(&mut self) {
        // Wipes the key data in place (the manager is the process's and stays).
        let (p, len) = self.key_mut();
        for i in 0..len {
            // SAFETY: within the key data; volatile, so the stores are not elided as dead.
            unsafe { std::ptr::write_volatile(p.add(i), 0) };
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn every_key_shares_the_process_manager() {
        let a = GcmKey::new(&[1u8; 16]).unwrap();
        let b = GcmKey::new(&[2u8; 32]).unwrap();
        assert_eq!(a.mgr, b.mgr);
        // Keys made and used on other threads work with it too.
        let t = std::thread::spawn(|| {
            let k = GcmKey::new(&[3u8; 16]).unwrap();
            let mut buf = [7u8; 64];
            let mut tag = [0u8; 16];
            k.seal(&[0; 12], b"aad", &mut buf, &mut tag);
            let mut t2 = [0u8; 16];
            k.open(&[0; 12], b"aad", &mut buf, &mut t2);
            (buf, tag == t2, k.mgr as usize)
        })
        .join()
        .unwrap();
        assert_eq!(t.0, [7u8; 64]);
        assert!(t.1);
        assert_eq!(t.2, a.mgr as usize);
    }

    #[test]
    fn gcm_spec_test_case_3() {
        let key = [
            0xfe, 0xff, 0xe9, 0x92, 0x86, 0x65, 0x73, 0x1c, 0x6d, 0x6a, 0x8f, 0x94, 0x67, 0x30,
            0x83, 0x08,
        ];
        let k = GcmKey::new(&key).unwrap();
        let iv = [
            0xca, 0xfe, 0xba, 0xbe, 0xfa, 0xce, 0xdb, 0xad, 0xde, 0xca, 0xf8, 0x88,
        ];
        let mut buf = [0u8; 0];
        let mut tag = [0u8; 16];
        k.seal(&iv, &[], &mut buf, &mut tag);
        assert_eq!(GcmKey::new(&[0u8; 5]).err(), Some(Error::KeyLength));
        assert!(!k.arch().is_empty());
        assert!(GcmKey::version().starts_with('1'));
    }

    #[test]
    fn the_inline_key_seals_as_the_whole_struct_does() {
        // The same key in a whole struct (as the library's own API keeps it) and in the key
        // as built: the same ciphertext and tag for every length class of the GCM code.
        let mgr = manager().unwrap();
        let extent = written_extent(mgr);
        assert!(extent > 0 && extent <= std::mem::size_of::<ffi::gcm_key_data>());
        for key in [&[0x42u8; 16][..], &[0x17u8; 32][..]] {
            let k = GcmKey::new(key).unwrap();
            assert_eq!(k.inline(), extent <= INLINE && k.arch() == "AVX2");
            let mut full = Box::new(FullKey(unsafe { std::mem::zeroed() }));
            let bits = if key.len() == 16 { 128 } else { 256 };
            // SAFETY: as in GcmKey::new, into a whole struct.
            unsafe {
                ffi::espada_imb_gcm_pre(
                    mgr,
                    bits,
                    key.as_ptr(),
                    (&mut *full as *mut FullKey).cast(),
                );
            }
            for len in [0usize, 1, 15, 16, 17, 64, 100, 255, 256, 257, 1400, 4000] {
                let mut a: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let mut b = a.clone();
                let (mut ta, mut tb) = ([0u8; 16], [0u8; 16]);
                k.seal(&[9; 12], b"aad!aad!", &mut a, &mut ta);
                // SAFETY: as `seal`, with the whole struct.
                unsafe {
                    ffi::espada_imb_gcm_enc(
                        mgr,
                        bits,
                        (&*full as *const FullKey).cast(),
                        b.as_mut_ptr(),
                        len as u64,
                        [9u8; 12].as_ptr(),
                        b"aad!aad!".as_ptr(),
                        8,
                        tb.as_mut_ptr(),
                    );
                }
                assert_eq!((a, ta), (b, tb), "{bits}-bit key, {len} bytes");
            }
        }
    }

    /// Inline keys are 16-byte aligned: wherever in a cache line a key lands (16, 32, 48 or 0
    /// bytes in: an SA's fields before it decide), it seals as a 64-byte aligned one does.
    #[test]
    fn an_inline_key_at_any_16_byte_offset_seals_alike() {
        #[repr(C, align(64))]
        struct At<const P: usize> {
            pad: [u8; P],
            key: GcmKey,
        }
        fn check<const P: usize>(key: &[u8], reference: &GcmKey) {
            let at = Box::new(At::<P> {
                pad: [0; P],
                key: GcmKey::new(key).unwrap(),
            });
            let addr = at.key.schedule().0 as usize;
            assert_eq!(
                addr % 64,
                P % 64,
                "the key is where the test means it to be"
            );
            for len in [0usize, 1, 17, 64, 68, 255, 1404, 4000] {
                let mut a: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
                let mut b = a.clone();
                let (mut ta, mut tb) = ([0u8; 16], [0u8; 16]);
                at.key.seal(&[3; 12], b"aad-aad-", &mut a, &mut ta);
                reference.seal(&[3; 12], b"aad-aad-", &mut b, &mut tb);
                assert_eq!((&a, ta), (&b, tb), "offset {P}, {len} bytes");
                let mut tc = [0u8; 16];
                at.key.open(&[3; 12], b"aad-aad-", &mut a, &mut tc);
                assert_eq!(tc, ta, "offset {P}, {len} bytes: open");
            }
        }
        for key in [&[0x61u8; 16][..], &[0x62u8; 32][..]] {
            let reference = GcmKey::new(key).unwrap();
            check::<16>(key, &reference);
            check::<32>(key, &reference);
            check::<48>(key, &reference);
            check::<64>(key, &reference);
        }
    }
}
