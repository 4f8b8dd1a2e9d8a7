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

/// `prev` and `next` of every slot.
#[derive(Debug)]
pub struct Links {
    prev: Vec<u32>,
    next: Vec<u32>,
}

impl Links {
    pub fn new(capacity: usize) -> Self {
        Self {
            prev: vec![NIL; capacity],
            next: vec![NIL; capacity],
        }
    }

    /// Appends `slot` at the tail of `list`.
    pub fn push_back(&mut self, list: &mut List, slot: u32) {
        let s = slot as usize;
        self.prev[s] = list.tail;
        self.next[s] = NIL;
        if list.tail == NIL {
            list.head = slot;
        } else {
            self.next[list.tail as usize] = slot;
        }
        list.tail = slot;
    }

    /// Unlinks `slot` from `list`.
    pub fn unlink(&mut self, list: &mut List, slot: u32) {
        let s = slot as usize;
        let (p, n) = (self.prev[s], self.next[s]);
        if p == NIL {
            list.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            list.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[s] = NIL;
        self.next[s] = NIL;
    }

    /// The slots of `list`, head first.
    pub fn iter(&self, list: &List) -> Vec<u32> {
        let mut out = Vec::new();
        let mut s = list.head;
        while s != NIL {
            out.push(s);
            s = self.next[s as usize];
        }
        out
    }
}
