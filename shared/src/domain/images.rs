//! Checks on image bytes that need no decoder: what the API and the
//! workers both refuse before an image is stored or charged for.

const ENDS_EARLY: &str = "truncated JPEG: the data ends before its end-of-image marker";

/// Why a JPEG's bytes stop before its end-of-image marker, if they do.
/// Walks the marker segments (skipping each payload by its length, so an
/// EXIF thumbnail's own end marker is not mistaken for the image's) and the
/// entropy-coded data after each start-of-scan. Decoders fill a cut-off
/// scan with grey instead of failing, so this is what tells a half-sent
/// photo from a whole one. Bytes after the end marker are ignored.
pub fn jpeg_truncation(b: &[u8]) -> Option<&'static str> {
    if b.len() < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return Some("not a JPEG: no start-of-image marker");
    }
    let mut i = 2;
    loop {
        if i >= b.len() {
            return Some(ENDS_EARLY);
        }
        if b[i] != 0xFF {
            return Some("corrupt JPEG: bytes between segments where a marker belongs");
        }
        // Fill bytes may precede a marker.
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = b.get(i) else {
            return Some(ENDS_EARLY);
        };
        i += 1;
        match marker {
            0xD9 => return None,
            // Markers without a payload.
            0x01 | 0xD0..=0xD7 => continue,
            _ => {
                let Some(len) = b
                    .get(i..i + 2)
                    .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
                else {
                    return Some(ENDS_EARLY);
                };
                if len < 2 {
                    return Some("corrupt JPEG: a segment with an impossible length");
                }
                i += len;
                if i > b.len() {
                    return Some(ENDS_EARLY);
                }
                if marker == 0xDA {
                    // Entropy-coded data: 0xFF is followed by 0x00 (a
                    // stuffed byte) or a restart marker, until the next
                    // real marker.
                    loop {
                        if i + 1 >= b.len() {
                            return Some(ENDS_EARLY);
                        }
                        if b[i] == 0xFF && b[i + 1] != 0x00 && !(0xD0..=0xD7).contains(&b[i + 1]) {
                            break;
                        }
                        i += 1;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small baseline JPEG: SOI, an APP1 holding a whole "thumbnail"
    /// (with its own SOI and EOI), tables, a scan with a stuffed byte and a
    /// restart marker, EOI.
    fn jpeg() -> Vec<u8> {
        let mut b = vec![0xFF, 0xD8];
        let thumb = [0xFF, 0xD8, 0x01, 0x02, 0xFF, 0xD9];
        b.extend([0xFF, 0xE1, 0x00, (2 + thumb.len()) as u8]);
        b.extend(thumb);
        b.extend([0xFF, 0xDB, 0x00, 0x04, 0x00, 0x01]);
        b.extend([0xFF, 0xDA, 0x00, 0x03, 0x01]);
        b.extend([0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56, 0x78]);
        b.extend([0xFF, 0xD9]);
        b
    }

    #[test]
    fn a_whole_jpeg_passes_and_every_cut_of_it_is_found() {
        let whole = jpeg();
        assert_eq!(jpeg_truncation(&whole), None);
        let mut trailing = whole.clone();
        trailing.extend([0x00, 0x00, 0x13]);
        assert_eq!(
            jpeg_truncation(&trailing),
            None,
            "bytes after EOI are ignored"
        );
        // Every prefix is refused, including those that end right after
        // the thumbnail's own end marker.
        for n in 0..whole.len() {
            assert!(
                jpeg_truncation(&whole[..n]).is_some(),
                "prefix of {n} bytes passed"
            );
        }
    }

    #[test]
    fn garbage_between_segments_is_corrupt() {
        let mut b = jpeg();
        b.insert(2, 0x42);
        assert!(jpeg_truncation(&b).is_some_and(|m| m.starts_with("corrupt")));
        assert!(jpeg_truncation(b"\x89PNG\r\n").is_some());
    }
}
