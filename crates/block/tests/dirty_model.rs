//! Dirty bitmaps on a node against a plain model: random writes, write-zeroes and bitmap
//! operations (add, clear, enable, disable, merge, freeze with the job endings) on a
//! `null-co` node; after every step each bitmap's bits and count equal the model's.

use std::collections::BTreeMap;
use std::sync::Arc;

use bitmap::Granularity;
use block::dirty::NodeBitmap;
use block::{BlockGraph, BlockdevOptions, Node, WriteFlags, ZeroFlags};
use proptest::prelude::*;

const SIZE: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64),
    Zero(u64, u64),
    Add(u8, u32),
    Clear(u8),
    Enable(u8, bool),
    Merge(u8, u8),
    Freeze(u8),
    /// End a freeze: true keeps only the writes since (abdicate), false merges them back.
    Thaw(u8, bool),
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE).prop_flat_map(|off| (Just(off), 1..=(SIZE - off).min(200_000)));
    prop_oneof![
        4 => range.clone().prop_map(|(o, l)| Op::Write(o, l)),
        1 => range.prop_map(|(o, l)| Op::Zero(o, l)),
        1 => (0..3u8, 9..18u32).prop_map(|(b, g)| Op::Add(b, g)),
        1 => (0..3u8).prop_map(Op::Clear),
        1 => (0..3u8, any::<bool>()).prop_map(|(b, e)| Op::Enable(b, e)),
        1 => (0..3u8, 0..3u8).prop_map(|(a, b)| Op::Merge(a, b)),
        1 => (0..3u8).prop_map(Op::Freeze),
        1 => (0..3u8, any::<bool>()).prop_map(|(b, k)| Op::Thaw(b, k)),
    ]
}

/// The model of one bitmap: one flag per chunk.
#[derive(Debug, Clone)]
struct Model {
    gran: u64,
    bits: Vec<bool>,
    enabled: bool,
    /// While frozen: the successor's bits.
    successor: Option<Vec<bool>>,
}

impl Model {
    fn mark(bits: &mut [bool], gran: u64, off: u64, len: u64) {
        for c in off / gran..=(off + len - 1) / gran {
            bits[c as usize] = true;
        }
    }

    fn write(&mut self, off: u64, len: u64) {
        let gran = self.gran;
        match &mut self.successor {
            Some(s) if self.enabled => Self::mark(s, gran, off, len),
            Some(_) => {}
            None if self.enabled => Self::mark(&mut self.bits, gran, off, len),
            None => {}
        }
    }

    /// The model's bits at another granularity (a merge source).
    fn bytes_dirty(&self, off: u64) -> bool {
        self.bits[(off / self.gran) as usize]
    }
}

fn name(b: u8) -> String {
    format!("b{b}")
}

async fn node() -> (BlockGraph, Arc<Node>) {
    let mut graph = BlockGraph::new();
    let opts: BlockdevOptions = serde_json::from_value(
        serde_json::json!({"driver": "null-co", "node-name": "n", "size": SIZE}),
    )
    .unwrap();
    let node = graph.add(opts).await.unwrap();
    (graph, node)
}

async fn apply(node: &Node, models: &mut BTreeMap<u8, Model>, op: &Op) {
    let get = |b: u8| node.bitmaps().get(&name(b));
    match *op {
        Op::Write(o, l) => {
            node.write(o, &vec![1u8; l as usize], WriteFlags::default())
                .await
                .unwrap();
            models.values_mut().for_each(|m| m.write(o, l));
        }
        Op::Zero(o, l) => {
            node.write_zeroes(o, l, ZeroFlags::default()).await.unwrap();
            models.values_mut().for_each(|m| m.write(o, l));
        }
        Op::Add(b, g) => {
            let gran = Granularity::from_bits(g).unwrap();
            let added = node
                .bitmaps()
                .add(Arc::new(NodeBitmap::new(name(b), SIZE, gran, true)));
            assert_eq!(added, !models.contains_key(&b));
            if added {
                let chunks = SIZE.div_ceil(gran.bytes()) as usize;
                models.insert(
                    b,
                    Model {
                        gran: gran.bytes(),
                        bits: vec![false; chunks],
                        enabled: true,
                        successor: None,
                    },
                );
            }
        }
        Op::Clear(b) => {
            if let (Some(bm), Some(m)) = (get(b), models.get_mut(&b)) {
                if m.successor.is_none() {
                    bm.lock().bits.clear();
                    m.bits.iter_mut().for_each(|x| *x = false);
                }
            }
        }
        Op::Enable(b, e) => {
            if let (Some(bm), Some(m)) = (get(b), models.get_mut(&b)) {
                if m.successor.is_none() {
                    bm.lock().enabled = e;
                    m.enabled = e;
                }
            }
        }
        Op::Merge(dst, src) => {
            let (Some(d), Some(s)) = (get(dst), get(src)) else {
                return;
            };
            if models[&dst].successor.is_some() {
                return;
            }
            let bits = s.lock().bits.clone();
            d.lock().bits.merge(&bits).unwrap();
            let source = models[&src].clone();
            let m = models.get_mut(&dst).unwrap();
            for c in 0..m.bits.len() as u64 {
                let (lo, hi) = (c * m.gran, ((c + 1) * m.gran).min(SIZE));
                let mut off = lo / source.gran * source.gran;
                while off < hi {
                    if source.bytes_dirty(off) {
                        m.bits[c as usize] = true;
                    }
                    off += source.gran;
                }
            }
        }
        Op::Freeze(b) => {
            if let (Some(bm), Some(m)) = (get(b), models.get_mut(&b)) {
                if m.successor.is_none() {
                    let frozen = bm.freeze();
                    assert_eq!(
                        frozen.dirty_chunks(),
                        m.bits.iter().filter(|x| **x).count() as u64
                    );
                    m.successor = Some(vec![false; m.bits.len()]);
                }
            }
        }
        Op::Thaw(b, keep_new_only) => {
            if let (Some(bm), Some(m)) = (get(b), models.get_mut(&b)) {
                if let Some(succ) = m.successor.take() {
                    if keep_new_only {
                        bm.abdicate();
                        m.bits = succ;
                    } else {
                        bm.reclaim();
                        for (x, y) in m.bits.iter_mut().zip(succ) {
                            *x |= y;
                        }
                    }
                }
            }
        }
    }
}

fn check(node: &Node, models: &BTreeMap<u8, Model>) {
    for (b, m) in models {
        let bm = node.bitmaps().get(&name(*b)).unwrap();
        let s = bm.lock();
        for (c, want) in m.bits.iter().enumerate() {
            assert_eq!(s.bits.get(c as u64 * m.gran), *want, "bitmap {b} chunk {c}");
        }
        let set = m.bits.iter().filter(|x| **x).count() as u64;
        assert_eq!(s.bits.count(), set * m.gran, "bitmap {b} count");
        drop(s);
        let info = bm.info();
        assert_eq!(info.busy, m.successor.is_some());
        assert_eq!(info.recording, m.enabled);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn bitmaps_follow_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (_graph, node) = node().await;
            let mut models = BTreeMap::new();
            for op in &ops {
                apply(&node, &mut models, op).await;
                check(&node, &models);
            }
        });
    }
}
