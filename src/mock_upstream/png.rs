//! A tiny, dependency-free PNG encoder for the mock provider's synthetic images.
//!
//! The output is a real PNG (signature, IHDR, one IDAT holding a zlib stream,
//! IEND, all CRCs correct) so clients and the gateway can treat it like a
//! provider's image. The zlib stream uses *stored* deflate blocks: nothing is
//! compressed, which keeps the encoder trivial and fast and makes body sizes
//! predictable for benchmarks (about `3 * width * height` bytes).

use sha2::{Digest, Sha256};

const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];
/// Largest payload of one stored deflate block (its LEN field is 16 bits).
const MAX_STORED_BLOCK: usize = 65_535;
const ADLER_MOD: u32 = 65_521;
/// Bytes that can be summed before `b` could overflow a u32 (zlib's NMAX).
const ADLER_NMAX: usize = 5_552;

/// Slicing-by-8 tables, built at compile time: the benchmark pushes megabytes
/// of pixels through the CRC per request, so a bytewise loop would show up.
static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut tables = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        tables[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut s = 1;
        while s < 8 {
            let prev = tables[s - 1][i];
            tables[s][i] = (prev >> 8) ^ tables[0][(prev & 0xff) as usize];
            s += 1;
        }
        i += 1;
    }
    tables
}

/// Feeds `data` into a running (pre-inverted) CRC-32 state.
fn crc32_update(mut crc: u32, data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = t[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// CRC-32 (IEEE, as used by PNG chunks).
pub(crate) fn crc32(data: &[u8]) -> u32 {
    !crc32_update(!0, data)
}

/// Adler-32 (the zlib trailer checksum).
pub(crate) fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(ADLER_NMAX) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= ADLER_MOD;
        b %= ADLER_MOD;
    }
    (b << 16) | a
}

/// Appends one chunk (length, type, data, CRC over type + data).
fn write_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    // PNG chunk lengths are 31-bit; our images are far below that because the
    // caller bounds the pixel size, but saturate rather than wrap regardless.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// Encodes filtered scanlines (`raw`, each row prefixed by its filter byte)
/// as a zlib stream made of stored deflate blocks.
fn zlib_stored(raw: &[u8]) -> Vec<u8> {
    let blocks = raw.len().div_ceil(MAX_STORED_BLOCK).max(1);
    let mut out = Vec::with_capacity(2 + raw.len() + blocks * 5 + 4);
    // CMF 0x78 (deflate, 32K window), FLG 0x01: (0x78 * 256 + 0x01) % 31 == 0.
    out.extend_from_slice(&[0x78, 0x01]);
    if raw.is_empty() {
        out.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    } else {
        let mut chunks = raw.chunks(MAX_STORED_BLOCK).peekable();
        while let Some(chunk) = chunks.next() {
            let is_final = chunks.peek().is_none();
            // BFINAL in bit 0, BTYPE=00 (stored); the rest of the byte is padding.
            out.push(u8::from(is_final));
            let len = chunk.len() as u16; // chunks() bounds this by MAX_STORED_BLOCK
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&(!len).to_le_bytes());
            out.extend_from_slice(chunk);
        }
    }
    out.extend_from_slice(&adler32(raw).to_be_bytes());
    out
}

/// Encodes 8-bit RGB scanlines that already carry their filter byte
/// (`height` rows of `1 + 3 * width` bytes) as a PNG file.
pub(crate) fn encode_rgb_scanlines(width: u32, height: u32, raw: &[u8]) -> Vec<u8> {
    let idat = zlib_stored(raw);
    let mut out = Vec::with_capacity(SIGNATURE.len() + 25 + idat.len() + 12 + 12);
    out.extend_from_slice(&SIGNATURE);
    let mut ihdr = [0u8; 13];
    ihdr[0..4].copy_from_slice(&width.to_be_bytes());
    ihdr[4..8].copy_from_slice(&height.to_be_bytes());
    ihdr[8] = 8; // bit depth
    ihdr[9] = 2; // colour type: truecolour RGB
    // compression 0, filter method 0, no interlace: already zero.
    write_chunk(&mut out, b"IHDR", &ihdr);
    write_chunk(&mut out, b"IDAT", &idat);
    write_chunk(&mut out, b"IEND", &[]);
    out
}

/// Renders the deterministic test image for `(prompt, index)`: a bilinear
/// gradient between four corner colours derived from a hash, so different
/// prompts (or different items of one request) give visibly different images
/// while the same inputs always give byte-identical files.
pub(crate) fn render(prompt: &str, index: usize, width: u32, height: u32) -> Vec<u8> {
    let width = width.max(1);
    let height = height.max(1);
    let mut hasher = Sha256::new();
    hasher.update(prompt.as_bytes());
    hasher.update([0u8]);
    hasher.update((index as u64).to_le_bytes());
    let seed = hasher.finalize();
    // Four corners: top-left, top-right, bottom-left, bottom-right.
    let corner = |i: usize| {
        [
            i32::from(seed[i * 3]),
            i32::from(seed[i * 3 + 1]),
            i32::from(seed[i * 3 + 2]),
        ]
    };
    let (tl, tr, bl, br) = (corner(0), corner(1), corner(2), corner(3));

    let w = width as usize;
    let h = height as usize;
    let row_len = 1 + 3 * w;
    let mut raw = vec![0u8; row_len * h];
    // 16.16 fixed point keeps the inner loop to adds and shifts.
    let wden = (w.max(2) - 1) as i32;
    let hden = (h.max(2) - 1) as i32;
    for (y, row) in raw.chunks_exact_mut(row_len).enumerate() {
        let y = y as i32;
        let mut acc = [0i32; 3];
        let mut step = [0i32; 3];
        for c in 0..3 {
            let left = (tl[c] << 16) + ((bl[c] - tl[c]) << 16) / hden * y;
            let right = (tr[c] << 16) + ((br[c] - tr[c]) << 16) / hden * y;
            acc[c] = left;
            step[c] = (right - left) / wden;
        }
        // row[0] is the filter byte and stays 0 (None).
        for px in row[1..].chunks_exact_mut(3) {
            px[0] = (acc[0] >> 16) as u8;
            px[1] = (acc[1] >> 16) as u8;
            px[2] = (acc[2] >> 16) as u8;
            acc[0] += step[0];
            acc[1] += step[1];
            acc[2] += step[2];
        }
    }
    encode_rgb_scanlines(width, height, &raw)
}

/// A decoded image, for tests only.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct Decoded {
    pub width: u32,
    pub height: u32,
    /// Filtered scanlines exactly as stored (filter byte + RGB per row).
    pub raw: Vec<u8>,
}

/// Strict decoder for what [`encode_rgb_scanlines`] produces: checks the
/// signature, every chunk CRC, the stored-block framing and the Adler-32.
#[cfg(test)]
pub(crate) fn decode(png: &[u8]) -> Result<Decoded, String> {
    if png.len() < 8 || png[..8] != SIGNATURE {
        return Err("bad signature".into());
    }
    let mut pos = 8;
    let mut dims = None;
    let mut idat = Vec::new();
    let mut saw_iend = false;
    while pos < png.len() {
        if pos + 12 > png.len() {
            return Err("truncated chunk".into());
        }
        let len = u32::from_be_bytes(png[pos..pos + 4].try_into().map_err(|_| "len")?) as usize;
        let kind = &png[pos + 4..pos + 8];
        let end = pos + 8 + len;
        if end + 4 > png.len() {
            return Err("chunk overruns file".into());
        }
        let stored_crc = u32::from_be_bytes(png[end..end + 4].try_into().map_err(|_| "crc")?);
        if crc32(&png[pos + 4..end]) != stored_crc {
            return Err(format!("bad CRC in {}", String::from_utf8_lossy(kind)));
        }
        let data = &png[pos + 8..end];
        match kind {
            b"IHDR" => {
                if data.len() != 13 || data[8] != 8 || data[9] != 2 {
                    return Err("unexpected IHDR".into());
                }
                let w = u32::from_be_bytes(data[0..4].try_into().map_err(|_| "w")?);
                let h = u32::from_be_bytes(data[4..8].try_into().map_err(|_| "h")?);
                dims = Some((w, h));
            }
            b"IDAT" => idat.extend_from_slice(data),
            b"IEND" => saw_iend = true,
            _ => return Err("unexpected chunk".into()),
        }
        pos = end + 4;
    }
    let (width, height) = dims.ok_or("no IHDR")?;
    if !saw_iend {
        return Err("no IEND".into());
    }
    if idat.len() < 6
        || idat[0] != 0x78
        || (u16::from(idat[0]) * 256 + u16::from(idat[1])) % 31 != 0
    {
        return Err("bad zlib header".into());
    }
    let mut raw = Vec::new();
    let mut p = 2;
    loop {
        let header = *idat.get(p).ok_or("truncated deflate")?;
        if header & 0b110 != 0 {
            return Err("not a stored block".into());
        }
        let len = u16::from_le_bytes([idat[p + 1], idat[p + 2]]);
        let nlen = u16::from_le_bytes([idat[p + 3], idat[p + 4]]);
        if len != !nlen {
            return Err("LEN/NLEN mismatch".into());
        }
        let start = p + 5;
        let stop = start + usize::from(len);
        raw.extend_from_slice(idat.get(start..stop).ok_or("truncated block")?);
        p = stop;
        if header & 1 == 1 {
            break;
        }
    }
    let adler = u32::from_be_bytes(
        idat.get(p..p + 4)
            .ok_or("no adler")?
            .try_into()
            .map_err(|_| "adler")?,
    );
    if adler != adler32(&raw) || p + 4 != idat.len() {
        return Err("bad adler32 / trailing data".into());
    }
    if raw.len() != height as usize * (1 + 3 * width as usize) {
        return Err("scanline size mismatch".into());
    }
    Ok(Decoded { width, height, raw })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn checksums_match_reference_vectors() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
        // The IEND chunk's well-known CRC.
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        // Slicing-by-8 must agree with the bytewise path at every alignment.
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
        for n in 0..40 {
            let bytewise = !data[..n].iter().fold(!0u32, |crc, &b| {
                CRC_TABLES[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
            });
            assert_eq!(crc32(&data[..n]), bytewise, "len {n}");
        }
    }

    #[test]
    fn adler_handles_long_inputs_without_overflow() {
        let data = vec![0xffu8; 200_000];
        // Reference: plain modular arithmetic per byte.
        let (mut a, mut b) = (1u64, 0u64);
        for &x in &data {
            a = (a + u64::from(x)) % 65_521;
            b = (b + a) % 65_521;
        }
        assert_eq!(u64::from(adler32(&data)), (b << 16) | a);
    }

    #[test]
    fn rendered_images_round_trip_and_are_deterministic() {
        let a = render("a red fox", 0, 64, 48);
        let decoded = decode(&a).unwrap();
        assert_eq!((decoded.width, decoded.height), (64, 48));
        assert_eq!(a, render("a red fox", 0, 64, 48));
        assert_ne!(a, render("a red fox", 1, 64, 48));
        assert_ne!(a, render("a blue fox", 0, 64, 48));
        // Every filter byte is None.
        assert!(decoded.raw.chunks(1 + 64 * 3).all(|row| row[0] == 0));
    }

    #[test]
    fn multi_block_and_degenerate_sizes_decode() {
        // 300x300 RGB is > 65535 bytes, so several stored blocks.
        let big = render("big", 0, 300, 300);
        let d = decode(&big).unwrap();
        assert_eq!((d.width, d.height), (300, 300));
        let tiny = render("tiny", 0, 1, 1);
        assert_eq!(decode(&tiny).unwrap().raw.len(), 4);
        // Zero dimensions are clamped rather than producing an invalid PNG.
        let z = decode(&render("zero", 0, 0, 0)).unwrap();
        assert_eq!((z.width, z.height), (1, 1));
    }

    #[test]
    fn gradient_reaches_the_corner_colours() {
        let png = render("corners", 3, 10, 10);
        let d = decode(&png).unwrap();
        let row_len = 1 + 30;
        let first = &d.raw[1..4];
        let last = &d.raw[9 * row_len + 1 + 27..9 * row_len + 1 + 30];
        let mut hasher = Sha256::new();
        hasher.update(b"corners");
        hasher.update([0u8]);
        hasher.update(3u64.to_le_bytes());
        let seed = hasher.finalize();
        assert_eq!(first, &seed[0..3]);
        // Fixed-point rounding may land one below the exact corner value.
        for c in 0..3 {
            assert!(i32::from(seed[9 + c]) - i32::from(last[c]) <= 2, "{c}");
        }
    }
}
