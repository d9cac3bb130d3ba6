//! Per-tag state, owned by the thread of the core serving the queue.
//!
//! A tag is either with the kernel (a FETCH or COMMIT_AND_FETCH is in flight), with the server
//! (a request is being served, maybe with backend I/O in flight), or finished. Transitions are
//! checked: an impossible one is a bug, caught by a debug assertion here and by the tests.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagState {
    /// Not yet fetched (before the queue starts).
    Idle,
    /// FETCH or COMMIT_AND_FETCH in flight: the kernel owns the tag.
    Fetching,
    /// A request was delivered and the target is serving it.
    Serving,
    /// Aborted or failed: never fetched again.
    Done,
}

#[derive(Clone, Copy, Debug)]
pub struct Tag {
    pub state: TagState,
    /// Backend operations in flight for the current request.
    pub inflight: u16,
    pub gen: u16,
}

impl Tag {
    pub const fn new() -> Self {
        Tag { state: TagState::Idle, inflight: 0, gen: 0 }
    }

    /// Idle → Fetching: the first FETCH_REQ was queued.
    pub fn fetch(&mut self) {
        debug_assert_eq!(self.state, TagState::Idle, "fetch from {:?}", self.state);
        self.state = TagState::Fetching;
    }

    /// Fetching → Serving: a request arrived. Returns the new generation.
    pub fn deliver(&mut self) -> u16 {
        debug_assert_eq!(self.state, TagState::Fetching, "deliver in {:?}", self.state);
        debug_assert_eq!(self.inflight, 0);
        self.state = TagState::Serving;
        self.gen = self.gen.wrapping_add(1);
        self.gen
    }

    /// A backend op was queued for the current request.
    pub fn issue(&mut self) {
        debug_assert_eq!(self.state, TagState::Serving, "issue in {:?}", self.state);
        self.inflight += 1;
    }

    /// A backend op's CQE arrived; false if it is stale (another generation or state).
    pub fn reap(&mut self, gen: u16) -> bool {
        if self.state != TagState::Serving || gen != self.gen || self.inflight == 0 {
            return false;
        }
        self.inflight -= 1;
        true
    }

    /// Serving → Fetching: the result is committed together with the next fetch.
    pub fn commit(&mut self) {
        debug_assert_eq!(self.state, TagState::Serving, "commit in {:?}", self.state);
        debug_assert_eq!(self.inflight, 0, "commit with backend I/O in flight");
        self.state = TagState::Fetching;
    }

    /// Fetching → Done: the kernel aborted the fetch (device going away) or failed it.
    pub fn finish(&mut self) {
        debug_assert_eq!(self.state, TagState::Fetching, "finish in {:?}", self.state);
        self.state = TagState::Done;
    }
}

impl Default for Tag {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_life() {
        let mut t = Tag::new();
        t.fetch();
        let g = t.deliver();
        t.issue();
        t.issue();
        assert!(t.reap(g));
        assert!(!t.reap(g.wrapping_add(1)), "other generation is stale");
        assert!(t.reap(g));
        assert!(!t.reap(g), "nothing left in flight");
        t.commit();
        assert_eq!(t.state, TagState::Fetching);
        let g2 = t.deliver();
        assert_ne!(g, g2);
        t.commit();
        t.finish();
        assert_eq!(t.state, TagState::Done);
    }

    #[test]
    fn stale_cqe_after_commit_is_rejected() {
        let mut t = Tag::new();
        t.fetch();
        let g = t.deliver();
        t.commit();
        assert!(!t.reap(g));
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "commit with backend I/O in flight")]
    fn commit_with_io_in_flight_is_a_bug() {
        let mut t = Tag::new();
        t.fetch();
        t.deliver();
        t.issue();
        t.commit();
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "deliver in Serving")]
    fn double_delivery_is_a_bug() {
        let mut t = Tag::new();
        t.fetch();
        t.deliver();
        t.deliver();
    }
}
