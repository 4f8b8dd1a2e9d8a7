//! Pushes to a shard's fixed table without sockets, as the protocol's push applies them: the
//! rows encoded as a request carries them, checked whole, then applied.

use hetkv_store::Table;
use hetkv_transport::wire::{le_array, PushRows};

/// Applies one push of `(key, count, gradient)` rows (`grads`: keys x dim) to `t`.
pub fn push(t: &Table, keys: &[u64], counts: &[u32], grads: &[f32]) {
    let k: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
    let c: Vec<u8> = counts.iter().flat_map(|c| c.to_le_bytes()).collect();
    let g: Vec<u8> = grads.iter().flat_map(|g| g.to_le_bytes()).collect();
    let locals = t
        .validate_push(le_array(&k), le_array(&c), le_array(&g))
        .unwrap();
    let rows = PushRows {
        keys: le_array(&k),
        counts: le_array(&c),
        bases: None,
        grads: le_array(&g),
    };
    t.apply_push(&locals, &rows, &mut hetkv_transport::Produced::default());
}
