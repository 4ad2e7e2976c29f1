//! profiling loop (temporary)
#[path = "../benches/common/mod.rs"]
mod common;
use common::*;
fn main() {
    let engine = common::engine(Shape::keys(1000));
    let table = KeyTable::for_keys(1000);
    let n: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(20_000_000);
    let t = std::time::Instant::now();
    for j in 0..n {
        std::hint::black_box(reserve_commit(&engine, &by_id(table.id(j))));
    }
    println!("{:.1} ns/op", t.elapsed().as_nanos() as f64 / n as f64);
}
