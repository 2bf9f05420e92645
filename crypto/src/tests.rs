//! Published GCM test vectors (McGrew & Viega, "The Galois/Counter Mode of Operation", test
//! cases 1, 3, 4, 15, 16; the same cases NIST's GCM validation lists), split into the RFC 4106
//! salt ‖ explicit-IV form, plus the differential test across backends.

use super::*;
use proptest::prelude::*;

struct Case {
    name: &'static str,
    key: &'static str,
    iv12: &'static str,
    aad: &'static str,
    pt: &'static str,
    ct_tag: &'static str,
}

const P: &str = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255";
const P60: &str = "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39";
const AAD: &str = "feedfacedeadbeeffeedfacedeadbeefabaddad2";

const CASES: &[Case] = &[
    Case {
        name: "gcm-tc1",
        key: "00000000000000000000000000000000",
        iv12: "000000000000000000000000",
        aad: "",
        pt: "",
        ct_tag: "58e2fccefa7e3061367f1d57a4e7455a",
    },
    Case {
        name: "gcm-tc3",
        key: "feffe9928665731c6d6a8f9467308308",
        iv12: "cafebabefacedbaddecaf888",
        aad: "",
        pt: P,
        ct_tag: "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f59854d5c2af327cd64a62cf35abd2ba6fab4",
    },
    Case {
        name: "gcm-tc4",
        key: "feffe9928665731c6d6a8f9467308308",
        iv12: "cafebabefacedbaddecaf888",
        aad: AAD,
        pt: P60,
        ct_tag: "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e0915bc94fbc3221a5db94fae95ae7121a47",
    },
    Case {
        name: "gcm-tc15",
        key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        iv12: "cafebabefacedbaddecaf888",
        aad: "",
        pt: P,
        ct_tag: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662898015adb094dac5d93471bdec1a502270e3cc6c",
    },
    Case {
        name: "gcm-tc16",
        key: "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308",
        iv12: "cafebabefacedbaddecaf888",
        aad: AAD,
        pt: P60,
        ct_tag: "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f66276fc6ece0f4e1768cddf8853bb2d551b",
    },
];

fn ciphers(alg: Algorithm, km: &KeyMaterial) -> Vec<Cipher> {
    let _ = alg;
    Backend::available()
        .iter()
        .map(|b| Cipher::new(*b, km).unwrap())
        .collect()
}

fn case_key(c: &Case) -> (KeyMaterial, [u8; 8]) {
    let key = hex::decode(c.key).unwrap();
    let iv12 = hex::decode(c.iv12).unwrap();
    let alg = if key.len() == 16 {
        Algorithm::AesGcm128
    } else {
        Algorithm::AesGcm256
    };
    // RFC 4106 §4: nonce = salt (4) ‖ IV (8): the first 4 nonce bytes are the salt.
    let mut ks = key.clone();
    ks.extend_from_slice(&iv12[..4]);
    let mut iv = [0u8; 8];
    iv.copy_from_slice(&iv12[4..]);
    (KeyMaterial::new(alg, &ks).unwrap(), iv)
}

#[test]
fn published_vectors_every_backend() {
    for c in CASES {
        let (km, iv) = case_key(c);
        let aad = hex::decode(c.aad).unwrap();
        let pt = hex::decode(c.pt).unwrap();
        let expect = hex::decode(c.ct_tag).unwrap();
        for cipher in ciphers(km.algorithm(), &km) {
            let mut buf = pt.clone();
            buf.extend_from_slice(&[0u8; TAG_LEN]);
            cipher.seal_in_place(&iv, &aad, &mut buf).unwrap();
            assert_eq!(buf, expect, "{} seal with {}", c.name, cipher.backend());
            let n = cipher.open_in_place(&iv, &aad, &mut buf).unwrap();
            assert_eq!(
                &buf[..n],
                &pt[..],
                "{} open with {}",
                c.name,
                cipher.backend()
            );
            // any flipped bit fails authentication
            let mut bad = expect.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0x80;
            assert_eq!(cipher.open_in_place(&iv, &aad, &mut bad), Err(AeadError));
        }
    }
}

#[test]
fn short_buffers_fail_cleanly() {
    let km = KeyMaterial::new(Algorithm::AesGcm128, &[7u8; 20]).unwrap();
    for cipher in ciphers(km.algorithm(), &km) {
        let mut b = [0u8; 15];
        assert_eq!(cipher.seal_in_place(&[0; 8], &[], &mut b), Err(AeadError));
        assert_eq!(cipher.open_in_place(&[0; 8], &[], &mut b), Err(AeadError));
    }
}

#[test]
fn key_material_checks_and_redacts() {
    let err = KeyMaterial::new(Algorithm::AesGcm128, &[1u8; 16]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "aes-gcm-128 keying material must be 20 bytes (key + 4-byte salt), got 16"
    );
    assert!(matches!(
        KeyMaterial::from_hex(Algorithm::AesGcm256, "zz"),
        Err(KeyError::Hex { expected: 72 })
    ));
    let km = KeyMaterial::from_hex(
        Algorithm::AesGcm128,
        "0x983f7aa575e5e2601597e294e1f2a063cd238cb5",
    )
    .unwrap();
    assert_eq!(km.salt(), [0xcd, 0x23, 0x8c, 0xb5]);
    let dbg = format!("{km:?}");
    assert!(!dbg.contains("983f") && dbg.contains("redacted"), "{dbg}");
    let c = Cipher::new(Backend::Ring, &km).unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("983f") && dbg.contains("redacted"), "{dbg}");
}

#[test]
fn lab_key_derivation_is_hkdf_sha256() {
    // Independent check: python3 -c "from cryptography.hazmat.primitives.kdf.hkdf import HKDF;
    //   from cryptography.hazmat.primitives import hashes;
    //   print(HKDF(hashes.SHA256(), 20, b'espada-lab-v1', b'lab|0x00001000').derive(b'secret').hex())"
    let k = derive_lab_key(Algorithm::AesGcm128, b"secret", "lab|0x00001000");
    assert_eq!(hex::encode(k.expose_key_and_salt()), LAB_KEY_EXPECTED);
    let k2 = derive_lab_key(Algorithm::AesGcm128, b"secret", "lab|0x00001001");
    assert_ne!(k, k2);
    assert_eq!(
        derive_lab_key(Algorithm::AesGcm256, b"s", "x")
            .expose_key_and_salt()
            .len(),
        36
    );
}

#[test]
fn names_round_trip() {
    for a in [Algorithm::AesGcm128, Algorithm::AesGcm256] {
        assert_eq!(Algorithm::from_name(a.name()), Some(a));
    }
    for b in [
        Backend::Ring,
        Backend::RustCrypto,
        Backend::AwsLc,
        Backend::IpsecMb,
        Backend::Hybrid,
    ] {
        assert_eq!(Backend::from_name(b.name()), Some(b));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    /// Every backend gives the same bytes on the same input, for sizes 0..=9000, both key sizes,
    /// 8- and 12-byte AAD; and each opens what the others sealed.
    #[test]
    fn backends_agree(
        big in any::<bool>(),
        key in proptest::collection::vec(any::<u8>(), 36),
        iv in any::<[u8; 8]>(),
        esn in any::<bool>(),
        aad in any::<[u8; 12]>(),
        len in 0usize..=9000,
        seed in any::<u8>(),
    ) {
        let alg = if big { Algorithm::AesGcm256 } else { Algorithm::AesGcm128 };
        let km = KeyMaterial::new(alg, &key[..alg.key_material_len()]).unwrap();
        let aad = if esn { &aad[..] } else { &aad[..8] };
        let pt: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
        let cs = ciphers(alg, &km);
        let mut outs = Vec::new();
        for c in &cs {
            let mut b = pt.clone();
            b.extend_from_slice(&[0; TAG_LEN]);
            c.seal_in_place(&iv, aad, &mut b).unwrap();
            outs.push(b);
        }
        for o in &outs[1..] {
            prop_assert_eq!(o, &outs[0]);
        }
        for c in &cs {
            let mut b = outs[0].clone();
            let n = c.open_in_place(&iv, aad, &mut b).unwrap();
            prop_assert_eq!(&b[..n], &pt[..]);
        }
    }
}
const LAB_KEY_EXPECTED: &str = "6901bb22e3a52f6e9d1769241c4f9a7ba4bc5c83";

/// Issue 27 paper cut: a key of the wrong length named its cipher as a Rust Debug value
/// (`(AesGcm128)`); it says `aes-gcm-128` now.
#[test]
fn a_wrong_key_length_names_the_cipher_as_configs_do() {
    let e = KeyMaterial::new(Algorithm::AesGcm128, &[0u8; 5])
        .expect_err("5 bytes are refused")
        .to_string();
    assert!(
        e.starts_with("aes-gcm-128 keying material must be 20 bytes"),
        "{e}"
    );
    assert!(!e.contains("AesGcm"), "{e}");
}

/// The hybrid backend switches implementation at [`HYBRID_RING_FROM`] bytes of text: both sides
/// of the switch give ring's bytes, and each opens what the other sealed.
#[cfg(feature = "ipsec-mb")]
#[test]
fn the_hybrid_switches_implementation_without_changing_a_byte() {
    for alg in [Algorithm::AesGcm128, Algorithm::AesGcm256] {
        let km = KeyMaterial::new(alg, &[0x42u8; 36][..alg.key_material_len()]).unwrap();
        let ring = Cipher::new(Backend::Ring, &km).unwrap();
        let mb = Cipher::new(Backend::IpsecMb, &km).unwrap();
        let hybrid = Cipher::new(Backend::Hybrid, &km).unwrap();
        assert_eq!(hybrid.backend(), Backend::Hybrid);
        for len in [
            0,
            1,
            68,
            HYBRID_RING_FROM - 1,
            HYBRID_RING_FROM,
            HYBRID_RING_FROM + 1,
            1404,
        ] {
            let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut a = pt.clone();
            a.extend_from_slice(&[0; TAG_LEN]);
            let mut b = a.clone();
            ring.seal_in_place(&[9; 8], &[1; 8], &mut a).unwrap();
            hybrid.seal_in_place(&[9; 8], &[1; 8], &mut b).unwrap();
            assert_eq!(a, b, "{alg} {len} bytes");
            // What the hybrid sealed, either single backend opens, and the reverse.
            let mut c = b.clone();
            assert_eq!(mb.open_in_place(&[9; 8], &[1; 8], &mut c), Ok(len));
            assert_eq!(hybrid.open_in_place(&[9; 8], &[1; 8], &mut a), Ok(len));
            assert_eq!(&a[..len], &pt[..]);
            b[len] ^= 1;
            assert_eq!(
                hybrid.open_in_place(&[9; 8], &[1; 8], &mut b),
                Err(AeadError)
            );
        }
    }
}
