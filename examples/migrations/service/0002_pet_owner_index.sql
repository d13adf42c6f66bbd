-- GET /owners/{id}/pets reads pets by owner.
CREATE INDEX ASYNC pet_owner_id ON pet (owner_id);
