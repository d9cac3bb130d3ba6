//! First-fit allocation of index ranges in a core ring's tables (fixed files, fixed buffers).
//! Control-path only: a queue takes its ranges when it arrives and gives them back when it
//! leaves.

/// Free ranges `(start, len)`, sorted by start and never adjacent (merged on give).
pub struct RangeAlloc {
    free: Vec<(u32, u32)>,
}

impl RangeAlloc {
    pub fn new(size: u32) -> RangeAlloc {
        RangeAlloc { free: if size > 0 { vec![(0, size)] } else { Vec::new() } }
    }

    /// The start of `len` free consecutive indexes, now taken; `None` if no gap is that long.
    pub fn take(&mut self, len: u32) -> Option<u32> {
        if len == 0 {
            return Some(0);
        }
        let i = self.free.iter().position(|&(_, l)| l >= len)?;
        let (start, l) = self.free[i];
        if l == len {
            self.free.remove(i);
        } else {
            self.free[i] = (start + len, l - len);
        }
        Some(start)
    }

    /// Gives `start..start+len` back (it must have come from `take`).
    pub fn give(&mut self, start: u32, len: u32) {
        if len == 0 {
            return;
        }
        let i = self.free.partition_point(|&(s, _)| s < start);
        debug_assert!(i == 0 || self.free[i - 1].0 + self.free[i - 1].1 <= start, "double give");
        self.free.insert(i, (start, len));
        if i + 1 < self.free.len() && start + len == self.free[i + 1].0 {
            self.free[i].1 += self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == start {
            self.free[i - 1].1 += self.free[i].1;
            self.free.remove(i);
        }
    }

    /// Indexes free in all.
    pub fn free(&self) -> u32 {
        self.free.iter().map(|&(_, l)| l).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_first_fit_and_merges_on_give() {
        let mut a = RangeAlloc::new(100);
        let x = a.take(10).unwrap();
        let y = a.take(20).unwrap();
        let z = a.take(30).unwrap();
        assert_eq!((x, y, z), (0, 10, 30));
        a.give(y, 20);
        assert_eq!(a.take(25), Some(60), "the gap of 20 is too small");
        assert_eq!(a.take(15), Some(10), "first fit");
        a.give(x, 10);
        a.give(10, 15);
        a.give(z, 30);
        a.give(60, 25);
        assert_eq!(a.free(), 100);
        assert_eq!(a.take(100), Some(0), "everything merged back into one range");
        assert_eq!(a.take(1), None);
        assert_eq!(a.take(0), Some(0));
    }
}
