//! Intrusive doubly linked lists over slot indices: many lists share one pair of arrays, and a
//! slot is in at most one list.

pub const NIL: u32 = u32::MAX;

/// The head and tail of one list.
#[derive(Clone, Copy, Debug)]
pub struct List {
    pub head: u32,
    pub tail: u32,
}

impl List {
    pub const EMPTY: Self = Self {
        head: NIL,
        tail: NIL,
    };

    pub fn is_empty(&self) -> bool {
        self.head == NIL
    }
}

/// `[prev, next]` of every slot, side by side so that a slot's links are one load.
#[derive(Clone, Debug)]
pub struct Links {
    links: Vec<[u32; 2]>,
}

const PREV: usize = 0;
const NEXT: usize = 1;

impl Links {
    pub fn new(capacity: usize) -> Self {
        Self {
            links: vec![[NIL, NIL]; capacity],
        }
    }

    /// Asks the CPU to load `slot`'s links.
    pub fn prefetch(&self, slot: u32) {
        hetkv_transport::region::prefetch(std::slice::from_ref(&self.links[slot as usize]));
    }

    /// Appends `slot` at the tail of `list`.
    pub fn push_back(&mut self, list: &mut List, slot: u32) {
        self.links[slot as usize] = [list.tail, NIL];
        if list.tail == NIL {
            list.head = slot;
        } else {
            self.links[list.tail as usize][NEXT] = slot;
        }
        list.tail = slot;
    }

    /// Unlinks `slot` from `list`.
    pub fn unlink(&mut self, list: &mut List, slot: u32) {
        let [p, n] = self.links[slot as usize];
        if p == NIL {
            list.head = n;
        } else {
            self.links[p as usize][NEXT] = n;
        }
        if n == NIL {
            list.tail = p;
        } else {
            self.links[n as usize][PREV] = p;
        }
        self.links[slot as usize] = [NIL, NIL];
    }

    /// The slots of `list`, head first.
    pub fn iter(&self, list: &List) -> Vec<u32> {
        let mut out = Vec::new();
        let mut s = list.head;
        while s != NIL {
            out.push(s);
            s = self.links[s as usize][NEXT];
        }
        out
    }
}
