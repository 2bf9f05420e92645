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

use std::alloc::{alloc_zeroed, dealloc, Layout};
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

/// An AES-GCM key for intel-ipsec-mb (the manager is the process's, see the crate docs).
pub struct GcmKey {
    mgr: *mut ffi::espada_imb,
    key: *mut u8,
    layout: Layout,
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
        // SAFETY: pure functions returning constants.
        let (size, align) = unsafe { (ffi::espada_imb_key_size(), ffi::espada_imb_key_align()) };
        let layout = Layout::from_size_align(size, align).map_err(|_| Error::Manager)?;
        // SAFETY: layout has non-zero size (sizeof(struct gcm_key_data)).
        let kd = unsafe { alloc_zeroed(layout) };
        if kd.is_null() {
            return Err(Error::Manager);
        }
        let k = GcmKey {
            mgr,
            key: kd,
            layout,
            bits,
        };
        // SAFETY: key points to `key.len()` readable bytes; kd is a zeroed, aligned
        // gcm_key_data; mgr is initialised.
        let r = unsafe { ffi::espada_imb_gcm_pre(mgr, bits, key.as_ptr(), kd.cast()) };
        if r != 0 {
            return Err(Error::Manager);
        }
        Ok(k)
    }

    /// Where the expanded key and GHASH table live and their size (for a prefetch: reading
    /// through the pointer is for the library only).
    pub fn schedule(&self) -> (*const u8, usize) {
        (self.key as *const u8, self.layout.size())
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
                self.key.cast(),
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
                self.key.cast(),
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
        // SAFETY: wipe then free the key data allocated in `new` with the same layout (the
        // manager is the process's and stays).
        unsafe {
            std::ptr::write_bytes(self.key, 0, self.layout.size());
            dealloc(self.key, self.layout);
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
}
