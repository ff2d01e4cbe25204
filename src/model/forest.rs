//! The snapshots of one domain: a forest with names, parents, children and
//! the current snapshot. Pure data, no I/O.

use std::collections::{BTreeMap, HashMap};

use super::snapshot::Snapshot;

/// Why the forest refused a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForestError {
    /// Another snapshot has this name.
    NameTaken(String),
    /// Another snapshot has this id.
    IdTaken(String),
    /// No snapshot has this id.
    NotFound(String),
}

impl std::fmt::Display for ForestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForestError::NameTaken(n) => write!(f, "snapshot name {n:?} is taken"),
            ForestError::IdTaken(i) => write!(f, "snapshot id {i:?} is taken"),
            ForestError::NotFound(i) => write!(f, "no snapshot with id {i:?}"),
        }
    }
}

impl std::error::Error for ForestError {}

/// All snapshots of a domain, indexed by id and by name.
#[derive(Debug, Default, Clone)]
pub struct Forest {
    by_id: BTreeMap<String, Snapshot>,
    id_by_name: HashMap<String, String>,
    current: Option<String>,
    generation: u64,
}

impl Forest {
    /// An empty forest.
    pub fn new() -> Self {
        Self::default()
    }

    /// A number that changes with every change of the forest (names,
    /// parents, images, current), so a cache of it knows when to look again.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of snapshots.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// True when there is no snapshot.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Adds a snapshot. A parent id that is not in the forest is dropped
    /// (the snapshot becomes a root). Fails if the name or id is taken.
    pub fn insert(&mut self, mut snap: Snapshot) -> Result<(), ForestError> {
        self.generation += 1;
        if self.id_by_name.contains_key(&snap.name) {
            return Err(ForestError::NameTaken(snap.name));
        }
        if self.by_id.contains_key(&snap.id) {
            return Err(ForestError::IdTaken(snap.id));
        }
        if snap
            .parent
            .as_ref()
            .is_some_and(|p| !self.by_id.contains_key(p))
        {
            snap.parent = None;
        }
        self.id_by_name.insert(snap.name.clone(), snap.id.clone());
        self.by_id.insert(snap.id.clone(), snap);
        Ok(())
    }

    /// The snapshot with this id.
    pub fn get(&self, id: &str) -> Option<&Snapshot> {
        self.by_id.get(id)
    }

    /// The snapshot with this id, to change it in place (not its name or id).
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Snapshot> {
        self.generation += 1;
        self.by_id.get_mut(id)
    }

    /// The snapshot with this name.
    pub fn by_name(&self, name: &str) -> Option<&Snapshot> {
        self.id_by_name.get(name).and_then(|id| self.by_id.get(id))
    }

    /// The name of the snapshot with this id.
    pub fn name_of(&self, id: &str) -> Option<&str> {
        self.by_id.get(id).map(|s| s.name.as_str())
    }

    /// All snapshots, oldest first (ties by name).
    pub fn iter_by_time(&self) -> Vec<&Snapshot> {
        let mut v: Vec<&Snapshot> = self.by_id.values().collect();
        v.sort_by(|a, b| (a.creation_time, &a.name).cmp(&(b.creation_time, &b.name)));
        v
    }

    /// All snapshots in id order (cheap; no sorting).
    pub fn iter(&self) -> impl Iterator<Item = &Snapshot> {
        self.by_id.values()
    }

    /// The children of a snapshot, oldest first.
    pub fn children(&self, id: &str) -> Vec<&Snapshot> {
        let mut v: Vec<&Snapshot> = self
            .by_id
            .values()
            .filter(|s| s.parent.as_deref() == Some(id))
            .collect();
        v.sort_by(|a, b| (a.creation_time, &a.name).cmp(&(b.creation_time, &b.name)));
        v
    }

    /// The id of the current snapshot: the parent of the next one.
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// Sets the current snapshot; an unknown id clears it.
    pub fn set_current(&mut self, id: Option<&str>) {
        self.generation += 1;
        self.current = id
            .filter(|i| self.by_id.contains_key(*i))
            .map(str::to_owned);
    }

    /// Removes a snapshot, gives its children its parent and moves
    /// `current` to the parent when it pointed here. Returns the removed
    /// snapshot and the ids of the reparented children.
    pub fn remove(&mut self, id: &str) -> Option<(Snapshot, Vec<String>)> {
        self.generation += 1;
        let snap = self.by_id.remove(id)?;
        self.id_by_name.remove(&snap.name);
        let mut moved = Vec::new();
        for s in self.by_id.values_mut() {
            if s.parent.as_deref() == Some(id) {
                s.parent = snap.parent.clone();
                moved.push(s.id.clone());
            }
        }
        if self.current.as_deref() == Some(id) {
            self.current = snap.parent.clone();
        }
        Some((snap, moved))
    }

    /// Renames a snapshot. Fails if the new name is taken by another one.
    pub fn rename(&mut self, id: &str, new_name: &str) -> Result<(), ForestError> {
        self.generation += 1;
        if let Some(other) = self.id_by_name.get(new_name) {
            return if other == id {
                Ok(())
            } else {
                Err(ForestError::NameTaken(new_name.to_owned()))
            };
        }
        let snap = self
            .by_id
            .get_mut(id)
            .ok_or_else(|| ForestError::NotFound(id.to_owned()))?;
        self.id_by_name.remove(&snap.name);
        snap.name = new_name.to_owned();
        self.id_by_name.insert(new_name.to_owned(), id.to_owned());
        Ok(())
    }

    /// The forest as text: one snapshot a line, children indented two
    /// spaces under their parent, the current one marked with ` *`.
    pub fn render_tree(&self) -> String {
        let mut kids: HashMap<Option<&str>, Vec<&Snapshot>> = HashMap::new();
        for s in self.iter_by_time() {
            kids.entry(s.parent.as_deref()).or_default().push(s);
        }
        let mut out = String::new();
        let mut stack: Vec<(&Snapshot, usize)> = Vec::new();
        if let Some(roots) = kids.get(&None) {
            stack.extend(roots.iter().rev().map(|s| (*s, 0)));
        }
        while let Some((s, depth)) = stack.pop() {
            for _ in 0..depth {
                out.push_str("  ");
            }
            out.push_str(&s.name);
            out.push_str(" (");
            out.push_str(s.state.as_str());
            out.push(')');
            if self.current.as_deref() == Some(s.id.as_str()) {
                out.push_str(" *");
            }
            out.push('\n');
            if let Some(children) = kids.get(&Some(s.id.as_str())) {
                stack.extend(children.iter().rev().map(|c| (*c, depth + 1)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::snapshot::{MemoryLocation, SnapshotState};

    fn snap(id: &str, parent: Option<&str>, t: i64) -> Snapshot {
        Snapshot {
            id: id.into(),
            name: format!("n-{id}"),
            description: None,
            creation_time: t,
            state: SnapshotState::Running,
            parent: parent.map(Into::into),
            memory: MemoryLocation::Internal,
            disks: vec![],
            domain_xml: None,
            memory_format: Default::default(),
            machine: None,
        }
    }

    fn sample() -> Forest {
        let mut f = Forest::new();
        f.insert(snap("a", None, 1)).unwrap();
        f.insert(snap("b", Some("a"), 2)).unwrap();
        f.insert(snap("c", Some("a"), 3)).unwrap();
        f.insert(snap("d", Some("b"), 4)).unwrap();
        f.set_current(Some("d"));
        f
    }

    #[test]
    fn renders_indented_tree_with_current() {
        let f = sample();
        assert_eq!(
            f.render_tree(),
            "n-a (running)\n  n-b (running)\n    n-d (running) *\n  n-c (running)\n"
        );
    }

    #[test]
    fn remove_reparents_and_moves_current() {
        let mut f = sample();
        let (_, moved) = f.remove("b").unwrap();
        assert_eq!(moved, vec!["d".to_string()]);
        assert_eq!(f.get("d").unwrap().parent.as_deref(), Some("a"));
        f.remove("d").unwrap();
        assert_eq!(f.current(), Some("a"));
        // deleting a root with two children leaves two roots
        let mut g = sample();
        g.remove("a").unwrap();
        assert!(g.get("b").unwrap().parent.is_none() && g.get("c").unwrap().parent.is_none());
    }

    #[test]
    fn names_are_unique_and_rename_works() {
        let mut f = sample();
        let mut dup = snap("z", None, 9);
        dup.name = "n-a".into();
        assert!(f.insert(dup).is_err());
        assert!(f.rename("a", "n-b").is_err());
        f.rename("a", "root").unwrap();
        assert_eq!(f.by_name("root").unwrap().id, "a");
        assert!(f.by_name("n-a").is_none());
        assert_eq!(f.children("a").len(), 2);
    }

    #[test]
    fn unknown_parent_becomes_root() {
        let mut f = Forest::new();
        f.insert(snap("x", Some("gone"), 1)).unwrap();
        assert!(f.get("x").unwrap().parent.is_none());
    }
}
