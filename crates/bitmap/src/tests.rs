use proptest::prelude::*;

use super::*;

fn g(bytes: u64) -> Granularity {
    Granularity::new(bytes).unwrap()
}

#[test]
fn granularity_outside_512_bytes_to_2_gib_is_refused() {
    assert_eq!(Granularity::new(256), Err(Error::Granularity(256)));
    assert_eq!(Granularity::new(4 << 30), Err(Error::Granularity(4 << 30)));
    assert_eq!(Granularity::new(3 << 10), Err(Error::Granularity(3 << 10)));
    assert_eq!(Granularity::new(0), Err(Error::Granularity(0)));
    assert_eq!(Granularity::from_bits(64), Err(Error::Granularity(0)));
    assert_eq!(Granularity::new(2 << 30).unwrap().bits(), 31);
    assert_eq!(Granularity::new(512).unwrap().bits(), 9);
}

#[test]
fn set_marks_every_touched_chunk_and_counts_whole_chunks() {
    let mut b = DirtyBitmap::new(10_000, g(4096));
    b.set(4095, 2);
    assert_eq!((b.get(0), b.get(4096), b.get(8192)), (true, true, false));
    assert_eq!((b.dirty_chunks(), b.count()), (2, 8192));
}

#[test]
fn set_past_the_end_is_clipped() {
    let mut b = DirtyBitmap::new(10_000, g(4096));
    b.set(9000, u64::MAX);
    b.set(20_000, 5);
    assert_eq!(
        b.dirty_extents(0, u64::MAX).collect::<Vec<_>>(),
        vec![8192..10_000]
    );
}

#[test]
fn reset_keeps_partly_covered_chunks() {
    let mut b = DirtyBitmap::new(3 * 4096, g(4096));
    b.set(0, 3 * 4096);
    b.reset(100, 4096 + 4000);
    assert_eq!((b.get(0), b.get(4096), b.get(8192)), (true, false, true));
}

#[test]
fn reset_to_the_end_clears_the_partial_last_chunk() {
    let mut b = DirtyBitmap::new(4096 + 100, g(4096));
    b.set(0, u64::MAX);
    b.reset(4096, 100);
    assert_eq!(b.dirty_chunks(), 1);
}

#[test]
fn serialized_bits_are_lsb_first() {
    let mut b = DirtyBitmap::new(64 * 512, g(512));
    b.set(512, 1); // bit 1
    b.set(9 * 512, 1); // bit 9
    assert_eq!(b.to_bytes(), vec![0b10, 0b10, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn deserialize_ignores_bits_past_the_last_chunk() {
    let b = DirtyBitmap::from_bytes(3 * 512, g(512), &[0xff]).unwrap();
    assert_eq!((b.dirty_chunks(), b.to_bytes()), (3, vec![0b111]));
}

#[test]
fn from_bytes_refuses_the_wrong_length() {
    let err = DirtyBitmap::from_bytes(3 * 512, g(512), &[0, 0]).unwrap_err();
    assert_eq!(err, Error::DataLength { got: 2, want: 1 });
}

#[test]
fn merge_of_a_different_size_is_refused() {
    let mut a = DirtyBitmap::new(1 << 20, g(65536));
    let err = a.merge(&DirtyBitmap::new(2 << 20, g(65536))).unwrap_err();
    assert_eq!(err, Error::SizeMismatch(1 << 20, 2 << 20));
}

#[test]
fn merge_across_granularities_marks_the_coarser_chunks() {
    let mut coarse = DirtyBitmap::new(1 << 20, g(65536));
    let mut fine = DirtyBitmap::new(1 << 20, g(512));
    fine.set(70_000, 1);
    coarse.merge(&fine).unwrap();
    assert_eq!(
        coarse.dirty_extents(0, 1 << 20).collect::<Vec<_>>(),
        vec![65536..131072]
    );
}

#[test]
fn resize_drops_chunks_past_the_new_end() {
    let mut b = DirtyBitmap::new(100 * 512, g(512));
    b.set(0, 100 * 512);
    b.resize(10 * 512 + 1);
    b.resize(100 * 512);
    assert_eq!(
        b.dirty_extents(0, u64::MAX).collect::<Vec<_>>(),
        vec![0..11 * 512]
    );
}

#[test]
fn empty_bitmap_hash_matches_qemu() {
    // x-debug-block-dirty-bitmap-sha256 of a fresh bitmap on a 64 MiB node at 64 KiB.
    let b = DirtyBitmap::new(64 << 20, g(65536));
    assert_eq!(
        b.sha256(),
        "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca"
    );
}

#[test]
fn zero_sized_bitmap_has_one_word_to_hash() {
    let b = DirtyBitmap::new(0, g(512));
    assert_eq!((b.chunks(), b.serialized_len(), b.words.len()), (0, 0, 1));
}

/// One request on the bitmap and on the model.
#[derive(Debug, Clone)]
enum Op {
    Set(u64, u64),
    Reset(u64, u64),
    Deserialize(u64, Vec<u8>),
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    let range = (0..size + 600, 0..size / 2 + 600);
    prop_oneof![
        range.clone().prop_map(|(o, l)| Op::Set(o, l)),
        range.prop_map(|(o, l)| Op::Reset(o, l)),
        (
            0..size / 4096 + 2,
            prop::collection::vec(any::<u8>(), 0..20)
        )
            .prop_map(|(o, d)| Op::Deserialize(o, d)),
    ]
}

/// The dumb model: one bool per chunk.
fn apply(model: &mut [bool], gran: u64, size: u64, op: &Op) {
    match *op {
        Op::Set(o, l) => {
            for (c, bit) in model.iter_mut().enumerate() {
                let (a, b) = (c as u64 * gran, ((c as u64 + 1) * gran).min(size));
                if l > 0 && o < b && o.saturating_add(l) > a {
                    *bit = true;
                }
            }
        }
        Op::Reset(o, l) => {
            for (c, bit) in model.iter_mut().enumerate() {
                let (a, b) = (c as u64 * gran, ((c as u64 + 1) * gran).min(size));
                let end = o.saturating_add(l);
                if o <= a && (end >= b || end >= size) && o < end {
                    *bit = false;
                }
            }
        }
        Op::Deserialize(o, ref d) => {
            for (i, byte) in d.iter().enumerate() {
                for k in 0..8 {
                    let c = (o + i as u64) * 8 + k;
                    if let Some(bit) = model.get_mut(c as usize) {
                        *bit = byte & (1 << k) != 0;
                    }
                }
            }
        }
    }
}

proptest! {
    #[test]
    fn bitmap_agrees_with_a_vec_of_bools(
        size in 0u64..300_000,
        gbits in 9u32..13,
        ops in prop::collection::vec(op(300_000), 0..12),
    ) {
        let gran = 1u64 << gbits;
        let mut b = DirtyBitmap::new(size, Granularity::from_bits(gbits).unwrap());
        let mut model = vec![false; size.div_ceil(gran) as usize];
        for op in &ops {
            match op {
                Op::Set(o, l) => b.set(*o, *l),
                Op::Reset(o, l) => b.reset(*o, *l),
                Op::Deserialize(o, d) => b.deserialize(*o, d),
            }
            apply(&mut model, gran, size, op);
        }
        let want: Vec<Range<u64>> = {
            let mut v: Vec<Range<u64>> = Vec::new();
            for (c, _) in model.iter().enumerate().filter(|(_, d)| **d) {
                let (a, e) = (c as u64 * gran, ((c as u64 + 1) * gran).min(size));
                match v.last_mut() {
                    Some(r) if r.end == a => r.end = e,
                    _ => v.push(a..e),
                }
            }
            v
        };
        prop_assert_eq!(b.dirty_extents(0, u64::MAX).collect::<Vec<_>>(), want);
        prop_assert_eq!(b.dirty_chunks(), model.iter().filter(|d| **d).count() as u64);
        let mut bytes = vec![0u8; model.len().div_ceil(8)];
        for (c, _) in model.iter().enumerate().filter(|(_, d)| **d) {
            bytes[c / 8] |= 1 << (c % 8);
        }
        prop_assert_eq!(b.to_bytes(), bytes.clone());
        let back = DirtyBitmap::from_bytes(size, b.granularity(), &bytes).unwrap();
        prop_assert_eq!(back, b);
    }
}
